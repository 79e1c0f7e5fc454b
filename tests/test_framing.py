"""Issue 11, item 5: a page's framing is checked before anything of it is applied.

Positions increase, lie inside (since, last_seq], and the page ends at its last
event; an upsert's key is the natural key of its data. Checked in one place
(changefeed_sync/target/framing.py) for pushed batches (HTTP 422, nothing moves) and for
feed pages (the follower stops the page with an error, nothing moves).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from django.test import override_settings

from changefeed_sync.exceptions import FramingError, ProtocolError
from changefeed_sync.models import DataSource, Target
from changefeed_sync.signing import SIGNATURE_HEADER, sign_request
from changefeed_sync.source import push
from changefeed_sync.target.follow import sync
from changefeed_sync.target.framing import check_page
from tests.dbs import require_alias
from tests.test_follow import LoopbackSource, country, page
from tests.testapp.models import Copy, Country, Language


def copy(seq: int, key: list[Any], language: list[Any], value: str = "v") -> dict[str, Any]:
    return {
        "seq": seq, "model": "testapp.copy", "op": "upsert", "key": key, "old_key": None,
        "data": {"language": language, "key": key[-1], "value": value, "tags": []},
    }  # fmt: skip


def delete(seq: int, code: str) -> dict[str, Any]:
    return {"seq": seq, "model": "testapp.country", "op": "delete", "key": [code],
            "old_key": None, "data": None}  # fmt: skip


C = 40

#: (name, since, last_seq, events, error code)
REFUSED = [
    ("a million positions ahead, no events", C, C + 1_000_000, [], "bad_framing"),
    ("claims positions after its last event", C, C + 9, [country(C + 1, "aa")], "bad_framing"),
    ("older event applied last", C, C + 2, [country(C + 2, "aa"), country(C + 1, "aa")],
     "bad_framing"),
    ("the same position twice", C, C + 1, [country(C + 1, "aa"), country(C + 1, "bb")],
     "bad_framing"),
    ("an event at or before since", C, C + 1, [country(C, "aa"), country(C + 1, "bb")],
     "bad_framing"),
    ("an event after last_seq", C, C + 1, [country(C + 2, "aa")], "bad_framing"),
    ("last_seq before since", C, C - 1, [], "bad_framing"),
    ("a position that is text", C, C + 1, [{**country(C + 1, "aa"), "seq": str(C + 1)}],
     "bad_framing"),
    ("a position that is a float", C, C + 1, [{**country(C + 1, "aa"), "seq": C + 1.0}],
     "bad_framing"),
    ("a position that is true", 0, 1, [{**country(1, "aa"), "seq": True}], "bad_framing"),
    ("a position beyond 64 bits", C, 2**64, [country(2**64, "aa")], "bad_framing"),
    ("key of another row", C, C + 1, [country(C + 1, "aa", key=["bb"])], "key_mismatch"),
    ("key through a foreign key", C, C + 1,
     [copy(C + 1, ["fr", "fr", "hello"], ["de", "fr"])], "key_mismatch"),
    ("key's last part", C, C + 1,
     [{**copy(C + 1, ["fr", "fr", "hello"], ["fr", "fr"]),
       "data": {"language": ["fr", "fr"], "key": "bye", "value": "", "tags": []}}],
     "key_mismatch"),
]  # fmt: skip

ACCEPTED = [
    ("nothing new", C, C, []),
    # Positions have holes: ids of rolled-back transactions, events of models a
    # Target does not receive. Holes are no loss and are not refused.
    ("holes between events", C, C + 5, [country(C + 1, "aa"), country(C + 5, "bb")]),
    ("a hole before the first event", C, C + 3, [country(C + 3, "aa")]),
    ("deletes carry no data", C, C + 2, [country(C + 1, "aa"), delete(C + 2, "aa")]),
    ("key through a foreign key", C, C + 1, [copy(C + 1, ["fr", "fr", "hello"], ["fr", "fr"])]),
]


MALFORMED = [
    ("an event that is a number", [5]),
    ("a key that is not a list", [{**country(C + 1, "aa"), "key": True}]),
    ("an old key that is text", [{**country(C + 1, "aa"), "old_key": "aa"}]),
    ("data that is a list", [{**country(C + 1, "aa"), "data": ["aa"]}]),
    ("no model", [{**country(C + 1, "aa"), "model": None}]),
    ("an op that is a number", [{**country(C + 1, "aa"), "op": 1}]),
]


@pytest.mark.parametrize("name, events", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_events(name: str, events: list[Any]) -> None:
    """Not the wire form at all: a malformed page (webhooks answer 400), not a framing error."""
    with pytest.raises(ProtocolError) as info:
        check_page(events, since=C, last_seq=C + 1)
    assert not isinstance(info.value, FramingError)


@pytest.mark.parametrize("name, since, last_seq, events, code", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused(name: str, since: int, last_seq: int, events: list[Any], code: str) -> None:
    with pytest.raises(FramingError) as info:
        check_page(events, since=since, last_seq=last_seq)
    assert info.value.code == code
    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("name, since, last_seq, events", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted(name: str, since: int, last_seq: int, events: list[Any]) -> None:
    check_page(events, since=since, last_seq=last_seq)


def test_keys_compare_in_their_decoded_form() -> None:
    """A key part sent as text that the data sends as a number (or the reverse) is
    the same key: big integers travel as strings beyond 2**53."""
    from changefeed_sync import registry
    from tests.testapp.models import Kinds

    options = registry.get_options(Kinds)
    assert options is not None
    data = {f: None for f in options.field_names} | {"slug": "s", "flag": False, "color": "red"}
    event = {"seq": 1, "model": "testapp.kinds", "op": "upsert", "key": ["s"], "data": data}
    check_page([event], since=0, last_seq=1)
    with pytest.raises(FramingError):
        check_page([{**event, "key": ["t"]}], since=0, last_seq=1)


# ---------------------------------------------------------------- webhooks, real HTTP


db = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(params=["postgres", "mariadb"])
def tgt(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    require_alias(request.param)
    with override_settings(CHANGEFEED_SYNC_TARGET_DATABASE=request.param):
        yield str(request.param)


def _post(url: str, path: str, body: dict[str, Any]) -> requests.Response:
    data = json.dumps(body).encode()
    signature = sign_request("regional", ["pw"], "POST", path, data)
    return requests.post(url, data=data, headers={SIGNATURE_HEADER: signature}, timeout=10)


@db
@pytest.mark.parametrize("name, since, last_seq, events, code", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_webhook_badly_framed_is_refused_and_moves_nothing(  # type: ignore[no-untyped-def]
    live_server, tgt: str, name: str, since: int, last_seq: int, events: list[Any], code: str
) -> None:
    fr = Country.objects.using(tgt).create(code="fr")
    Language.objects.using(tgt).create(country=fr, code="fr")
    source = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets="pw",
        checkpoint=C,
    )  # fmt: skip
    before = (Country.objects.using(tgt).count(), Copy.objects.using(tgt).count())
    path = "/sync/webhook/hq/"
    body = {"protocol": 1, "id": f"regional-{since}-{last_seq}", "since": since,
            "last_seq": last_seq, "events": events}  # fmt: skip
    r = _post(live_server.url + path, path, body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == code and r.json()["error"]
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == C
    assert (Country.objects.using(tgt).count(), Copy.objects.using(tgt).count()) == before


@db
def test_a_webhook_well_framed_is_applied(live_server, tgt: str) -> None:  # type: ignore[no-untyped-def]
    """The holes case: applied, the checkpoint moves to last_seq."""
    source = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets="pw",
        checkpoint=C,
    )  # fmt: skip
    path = "/sync/webhook/hq/"
    events = [country(C + 1, "aa"), country(C + 5, "bb")]
    r = _post(live_server.url + path, path,
              {"protocol": 1, "since": C, "last_seq": C + 5, "events": events})  # fmt: skip
    assert r.status_code == 200 and r.json()["status"] == "applied", r.text
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == C + 5
    assert Country.objects.using(tgt).count() == 2


@db
def test_pushed_batches_pass_the_check(live_server, tgt: str) -> None:  # type: ignore[no-untyped-def]
    """What the source really sends, a Target limited to some models among them."""
    DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets="pw"
    )
    target = Target.objects.create(name="regional", secrets="pw", paused=True,
                                   webhook_url=live_server.url + "/sync/webhook/hq/",
                                   model_labels=["testapp.country"])  # fmt: skip
    fr = Country.objects.create(code="fr")
    Language.objects.create(country=fr, code="fr")
    Country.objects.create(code="de")
    batches = list(push.batches(target, "default", max_events=1))
    assert len(batches) == 2 and batches[1].since == batches[0].last_seq
    for batch in batches:
        r = requests.post(target.webhook_url, data=batch.body,
                          headers=push.signed_headers(batch), timeout=10)  # fmt: skip
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
    assert sorted(Country.objects.using(tgt).values_list("code", flat=True)) == ["de", "fr"]


# ---------------------------------------------------------------- feed pages, real HTTP


@db
@pytest.mark.parametrize("name, since, last_seq, events, code", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_feed_page_badly_framed_stops_the_sync_and_moves_nothing(
    name: str, since: int, last_seq: int, events: list[Any], code: str
) -> None:
    fr = Country.objects.create(code="fr")
    Language.objects.create(country=fr, code="fr")
    with LoopbackSource([page(since, events, last_seq)]) as src:
        ds = DataSource.objects.create(
            name="hq", url=src.url, client_name="regional", secrets="pw", checkpoint=since
        )
        with pytest.raises(FramingError) as info:
            sync(ds)
    assert info.value.code == code
    ds.refresh_from_db()
    assert ds.checkpoint == since
    assert "feed page refused" in ds.last_error
    assert (Country.objects.count(), Copy.objects.count()) == (1, 0)
