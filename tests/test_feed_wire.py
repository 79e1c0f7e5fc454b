"""The feed passes the stored JSON through: what it sends must equal what the
ORM reads from the outbox, on every backend (ids, timestamps with their
offset, keys, data of every JSON shape, NULL and JSON null)."""

from __future__ import annotations

import datetime
import json

import pytest
from django.db import transaction
from django.utils import timezone

from changefeed_sync import outbox
from changefeed_sync.models import Event
from changefeed_sync.source import feed

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ODD_DATA = {
    "text": 'quotes " and \\ backslash, tab\t, newline\n, unicode é 中 😀',
    "big": 2**63 - 1,
    "neg": -5,
    "float": 1.5,
    "nested": {"list": [1, [2, {"a": None}]], "empty": {}, "t": True, "f": False},
    "none": None,
}


def _expected(alias: str, since: int) -> list[dict[str, object]]:
    return [
        {
            "seq": e.position,
            "ts": e.created_at.isoformat(),
            "model": e.model,
            "op": e.op,
            "key": e.key,
            "old_key": e.old_key,
            "data": e.data,
            "changed": e.changed,
        }
        for e in Event.objects.using(alias).filter(position__gt=since).order_by("position")
    ]


def test_feed_sends_what_the_outbox_holds(db_alias: str) -> None:
    since = feed.head(db_alias)
    with transaction.atomic(using=db_alias):
        outbox.write(
            db_alias,
            [
                outbox.make_event("testapp.country", "upsert", ["c1"], data=ODD_DATA,
                                  changed=["text"]),
                outbox.make_event("testapp.country", "upsert", ["c2"], old_key=["c1"],
                                  data={"code": "c2"}, changed=[]),
                outbox.make_event("testapp.country", "delete", ["c2"]),
            ],
        )  # fmt: skip
    page = feed.read(since, 10, using=db_alias)
    expected = _expected(db_alias, since)
    assert len(expected) == 3
    assert page.events == expected
    assert page.events[0]["data"] == ODD_DATA
    assert page.events[2]["data"] is None and page.events[2]["old_key"] is None
    assert page.last_seq == expected[-1]["seq"] and page.more is False
    # The wire document is valid JSON with the same events.
    wire = json.loads(page.to_json())
    assert wire["events"] == expected
    assert wire["protocol"] == 1 and wire["since"] == since and wire["last_seq"] == page.last_seq


def test_written_events_hold_what_the_orm_would_write(db_alias: str) -> None:
    """outbox.write builds its INSERT by hand (no Event instances): each column
    must hold what saving the same Event through the ORM stores."""
    events = [
        outbox.make_event("testapp.country", "upsert", ["c1", 2], old_key=["c0", 1],
                          data=ODD_DATA, changed=["text", "big"]),
        outbox.make_event("testapp.country", "delete", ["é 中"]),
        outbox.make_event("testapp.country", "upsert", [None], data={}, changed=[]),
    ]  # fmt: skip
    mark = Event.objects.using(db_alias).order_by("-id").values_list("id", flat=True).first() or 0
    before = timezone.now()
    with transaction.atomic(using=db_alias):
        outbox.write(db_alias, events)
    after = timezone.now()
    with transaction.atomic(using=db_alias):
        for event in events:
            event.instance().save(using=db_alias)
    columns = ("model", "op", "key", "old_key", "data", "changed")
    rows = list(Event.objects.using(db_alias).filter(id__gt=mark).order_by("id"))
    written, saved = rows[:3], rows[3:]
    assert len(written) == len(saved) == 3
    for ours, orm in zip(written, saved):
        assert [getattr(ours, c) for c in columns] == [getattr(orm, c) for c in columns]
        assert before - datetime.timedelta(seconds=1) <= ours.created_at <= after
    # NULL, not JSON null, where an event has no old key, data or list of changes.
    raw = Event.objects.using(db_alias).filter(
        id=written[1].id, old_key__isnull=True, data__isnull=True, changed__isnull=True
    )
    assert raw.exists()


def test_the_direct_insert_names_every_event_column() -> None:
    from changefeed_sync.outbox import _COLUMNS

    assert list(_COLUMNS) == [
        f.column for f in Event._meta.concrete_fields if not f.primary_key
    ]


def test_feed_filters_models_and_counts_pending(db_alias: str) -> None:
    since = feed.head(db_alias)
    with transaction.atomic(using=db_alias):
        outbox.write(
            db_alias,
            [
                outbox.make_event("testapp.tag" if i % 2 else "testapp.country", "upsert",
                                  [f"k{i}"], data={}, changed=[])
                for i in range(7)
            ],
        )  # fmt: skip
    page = feed.read(since, 2, using=db_alias, models=["testapp.tag"])
    assert [e["key"] for e in page.events] == [["k1"], ["k3"]]
    assert page.more is True and page.pending == 1
    rest = feed.read(page.last_seq, 10, using=db_alias, models=["testapp.tag"])
    assert [e["key"] for e in rest.events] == [["k5"]] and rest.more is False


def test_timestamps_keep_the_databases_own_time_zone() -> None:
    """Where the database keeps no offset and its DATABASES TIME_ZONE is not UTC,
    stored times are that zone's (Django's rule); the feed must say so. A pure
    function of the stored values and the connection's zone, so a stand-in
    connection carries the zone."""
    from types import SimpleNamespace
    from zoneinfo import ZoneInfo

    from changefeed_sync.source.feed import _timestamps

    paris = SimpleNamespace(timezone_name="Europe/Paris", timezone=ZoneInfo("Europe/Paris"))
    utc = SimpleNamespace(timezone_name="UTC", timezone=datetime.timezone.utc)
    stored = "2026-01-02 03:04:05.000006"
    naive = datetime.datetime(2026, 7, 2, 3, 4, 5)
    assert _timestamps([stored, naive], paris) == [
        "2026-01-02T03:04:05.000006+01:00",
        "2026-07-02T03:04:05+02:00",
    ]
    assert _timestamps([stored, naive], utc) == [
        "2026-01-02T03:04:05.000006+00:00",
        "2026-07-02T03:04:05+00:00",
    ]
