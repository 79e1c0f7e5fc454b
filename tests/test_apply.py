"""Apply: feed events replayed on a target, idempotent, all or nothing per page."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest
from django.db import transaction

import changefeed_sync
from changefeed_sync import registry
from changefeed_sync.exceptions import ApplyError
from changefeed_sync.keys import resolve_keys
from changefeed_sync.models import DataSource, Event, Target
from changefeed_sync.registry import Key
from changefeed_sync.source import feed
from changefeed_sync.target.apply import apply_page
from tests.helpers import data_source, events, pump, state
from tests.testapp.models import Category, Copy, Country, Kinds, Language, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def _seed(alias: str, countries: int = 3, keys: int = 4) -> None:
    for c in range(countries):
        country = Country.objects.using(alias).create(code=f"c{c}", name=f"Country {c}")
        lang = Language.objects.using(alias).create(country=country, code="xx", name="X")
        red = Tag.objects.using(alias).get_or_create(slug="red")[0]
        for k in range(keys):
            copy = Copy.objects.using(alias).create(language=lang, key=f"k{k}", value=f"v{k}")
            if k % 2:
                copy.tags.add(red)


def test_replicates_across_backends(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    _seed(src)
    ds = data_source(tgt)
    pump(src, tgt, ds, limit=7)
    assert state(tgt) == state(src)
    assert ds.checkpoint == events(src)[-1].position
    # Changes of every kind, then sync again.
    c0 = Country.objects.using(src).get(code="c0")
    c0.name = "Renamed"
    c0.save()
    Copy.objects.using(src).filter(key="k0").update(value="bulk")
    Country.objects.using(src).get(code="c2").delete()
    Tag.objects.using(src).get(slug="red").copies.clear()
    pump(src, tgt, ds, limit=5)
    assert state(tgt) == state(src)
    assert not Country.objects.using(tgt).filter(code="c2").exists()


def test_replaying_a_page_changes_nothing(db_alias: str) -> None:
    src, tgt = db_alias, db_alias
    # Source and target share a database here, so apply into a second set of keys:
    # copy the feed from one alias's events and replay it twice on a fresh target.
    _seed(src, countries=1, keys=2)
    page = feed.read(0, 100, using=src)
    for model in (Copy, Language, Country, Tag):
        with transaction.atomic(using=tgt):
            from changefeed_sync import applying

            with applying():
                model.objects.using(tgt).all().delete()
    Event.objects.using(tgt).all().delete()
    ds = data_source(tgt)
    apply_page(ds, page.events, since=0, last_seq=page.last_seq, using=tgt)
    first = state(tgt)
    # A second apply with the old cursor is refused: the checkpoint moved.
    assert apply_page(ds, page.events, since=0, last_seq=page.last_seq, using=tgt) is None
    # Forcing the same events again (a rewound feed) leaves the same state.
    DataSource.objects.using(tgt).filter(pk=ds.pk).update(checkpoint=0)
    ds.checkpoint = 0
    apply_page(ds, page.events, since=0, last_seq=page.last_seq, using=tgt)
    assert state(tgt) == first
    assert Copy.objects.using(tgt).count() == 2
    assert Event.objects.using(tgt).count() == 0  # no echo


def test_unresolvable_event_stops_and_writes_nothing(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    _seed(src, countries=1, keys=1)
    ds = data_source(tgt)
    page = feed.read(0, 100, using=src)
    good = page.events[:2]  # country, language
    bad = {
        "seq": page.last_seq + 1, "model": "testapp.copy", "op": "upsert",
        "key": ["zz", "xx", "k"], "old_key": None, "changed": None,
        "data": {"language": ["zz", "xx"], "key": "k", "value": "v", "tags": []},
    }
    with pytest.raises(ApplyError) as info:
        apply_page(ds, [*good, bad], since=0, last_seq=bad["seq"], using=tgt)
    message = str(info.value)
    assert "testapp.copy" in message and "['zz', 'xx', 'k']" in message and "language" in message
    assert Country.objects.using(tgt).count() == 0  # the good part of the batch rolled back too
    ds.refresh_from_db(using=tgt)
    assert ds.checkpoint == 0


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda e: e.update(model="testapp.nosuch"), None),
        (lambda e: e["data"].update(extra=1), "extra"),
        (lambda e: e["data"].pop("name"), "name"),
    ],
    ids=["unknown-model", "unknown-field", "missing-field"],
)
def test_bad_events_name_what_is_wrong(mutate: object, field: str | None) -> None:
    Country.objects.create(code="aa", name="A")
    event = feed.read(0, 10, using="default").events[0]
    mutate(event)  # type: ignore[operator]
    ds = data_source("default")
    with pytest.raises(ApplyError) as info:
        apply_page(ds, [event], since=0, last_seq=event["seq"], using="default")
    assert event["model"] in str(info.value)
    if field:
        assert f"field={field}" in str(info.value)


def test_rename_is_applied_in_place(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    _seed(src, countries=1, keys=2)
    ds = data_source(tgt)
    pump(src, tgt, ds)
    before = Country.objects.using(tgt).get(code="c0").pk
    copies_before = sorted(Copy.objects.using(tgt).values_list("pk", flat=True))
    c0 = Country.objects.using(src).get(code="c0")
    c0.code = "cx"
    c0.save()
    pump(src, tgt, ds)
    assert Country.objects.using(tgt).get(code="cx").pk == before
    assert sorted(Copy.objects.using(tgt).values_list("pk", flat=True)) == copies_before
    assert state(tgt) == state(src)


def test_swap_of_natural_keys(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    Country.objects.using(src).create(code="aa", name="A")
    Country.objects.using(src).create(code="bb", name="B")
    ds = data_source(tgt)
    pump(src, tgt, ds)
    pks = dict(Country.objects.using(tgt).values_list("name", "pk"))
    a = Country.objects.using(src).get(code="aa")
    b = Country.objects.using(src).get(code="bb")
    a.code = "tm"
    a.save()
    b.code = "aa"
    b.save()
    a.code = "bb"
    a.save()
    pump(src, tgt, ds)
    assert dict(Country.objects.using(tgt).values_list("name", "code")) == {"A": "bb", "B": "aa"}
    assert dict(Country.objects.using(tgt).values_list("name", "pk")) == pks


def test_self_reference_and_coalescing_in_one_page(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    root = Category.objects.using(src).create(slug="root")
    kid = Category.objects.using(src).create(slug="kid", parent=root)
    Category.objects.using(src).create(slug="grandkid", parent=kid)
    for _ in range(5):
        root.slug = "root"  # same key, several updates: coalesced to one write
        root.save()
    Category.objects.using(src).create(slug="tmp").delete()
    ds = data_source(tgt)
    stats = pump(src, tgt, ds, limit=1000)
    assert state(tgt) == state(src)
    assert stats.upserted["testapp.category"] == 4  # root, kid, grandkid, tmp (once)
    assert not Category.objects.using(tgt).filter(slug="tmp").exists()


def test_field_types_round_trip(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    tz = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    Kinds.objects.using(src).create(
        slug="all", big=2**62 + 1, dec=decimal.Decimal("123456.123456"),
        when=datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=tz),
        day=datetime.date(1999, 12, 31), uid=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        blob=b"\x00\xffbinary", doc={"a": [1, 2, {"b": None}], "c": "é"}, flag=True,
        ratio=0.1, span=datetime.timedelta(days=2, microseconds=7), color="blue",
    )
    Kinds.objects.using(src).create(slug="empty")
    ds = data_source(tgt)
    pump(src, tgt, ds)
    for slug in ("all", "empty"):
        a = Kinds.objects.using(src).get(slug=slug)
        b = Kinds.objects.using(tgt).get(slug=slug)
        for f in Kinds._meta.concrete_fields:
            if f.primary_key:
                continue
            va, vb = getattr(a, f.attname), getattr(b, f.attname)
            if isinstance(va, memoryview | bytes):
                va, vb = bytes(va), bytes(vb)
            assert va == vb, f.name


def test_relay_passes_changes_on(backend_pair: tuple[str, str]) -> None:
    """A -> B -> C: B is a source for C (it has a Target), so it re-publishes what it applies."""
    a, b = backend_pair
    Target.objects.using(b).create(name="c", secrets="s")
    _seed(a, countries=1, keys=2)
    ds = data_source(b)
    pump(a, b, ds)
    # B's outbox now carries A's changes; C reads B's feed like any other.
    relayed = [(e.model, e.op, e.key) for e in events(b)]
    assert relayed == [(e.model, e.op, e.key) for e in events(a)]


@pytest.mark.parametrize(
    "wanted",
    [
        # Nearly the whole cross product of the parts' values: one IN per part.
        [("c0", "l0"), ("c1", "l1"), ("c0", "l1"), ("c0", "zz")],
        # Sparse: one condition per group of leading parts.
        [("c0", "l0"), ("c1", "l1"), ("c2", "l2")],
    ],
    ids=["cross-product", "grouped"],
)
def test_resolve_keys_returns_exactly_the_wanted_rows(db_alias: str, wanted: list[Key]) -> None:
    with changefeed_sync.applying():
        countries = [Country.objects.using(db_alias).create(code=f"c{i}") for i in range(3)]
        pks = {
            (c.code, f"l{j}"): Language.objects.using(db_alias).create(country=c, code=f"l{j}").pk
            for c in countries
            for j in range(3)
        }
    options = registry.get_options(Language)
    assert options is not None
    found = resolve_keys(options, wanted, db_alias)
    # Rows in the cross product but not wanted (c1/l0, ...) must not come back.
    assert found == {key: pks[key] for key in wanted if key in pks}
