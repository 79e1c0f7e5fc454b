"""Issue 14: the feed of a Target whose row filters read the models' own fields.

Real HTTP to a live server of this process serving each database in turn as the
source, into another database as the target (tests.dbs.BACKEND_PAIRS). A filtered
Data Pull, then changes on the source that move rows into and out of the filter
(saves, QuerySet.update, bulk_update, renames, deletes, many-to-many edits), then
the feed applied once: the target must hold exactly what the ORM selects on the
source (``Model.objects.filter(**lookups)``), and no event it received carries a
row outside the filter. A changed filter asks for a Data Pull (410
``filter_changed``), after which the feed goes on.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from changefeed_sync import registry
from changefeed_sync.exceptions import CursorExpired, FilterChanged
from changefeed_sync.models import DataSource, Target
from changefeed_sync.serialization import payloads_from_db
from changefeed_sync.source import feed, routes
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.follow import sync
from changefeed_sync.target.pull import run_pull
from tests.helpers import state
from tests.testapp.models import Copy, Country, Language, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(300),
]

SECRET = "filtered-feed-secret"
FILTERS: dict[str, dict[str, Any]] = {"testapp.copy": {"value__startswith": "pub"}}


def expected(alias: str) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    out = {}
    for options in registry.all_options():
        rows = options.model._base_manager.using(alias).filter(**FILTERS.get(options.label, {}))
        payloads = payloads_from_db(options, list(rows.values_list("pk", flat=True)), alias)
        out[options.label] = {tuple(p["key"]): p["data"] for p in payloads.values()}
    return out


class Sides:
    def __init__(self, src: str, tgt: str, ds: DataSource) -> None:
        self.src, self.tgt, self.ds = src, tgt, ds
        self.seen: list[dict[str, Any]] = []  # every feed event the target received

    def client(self) -> SourceClient:
        session = requests.Session()

        def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            if "/sync/feed/" in response.request.path_url and response.status_code == 200:
                for line in response.text.splitlines():
                    if line.strip():
                        self.seen += json.loads(line).get("events", [])

        session.hooks["response"].append(record)
        return SourceClient(self.ds, session)

    def pull(self) -> None:
        run_pull(self.ds, using=self.tgt, client=self.client(), allow_mass_delete=True)
        self.ds.refresh_from_db(using=self.tgt)

    def follow(self, limit: int | None = None) -> None:
        sync(self.ds, using=self.tgt, client=self.client(), limit=limit)
        self.ds.refresh_from_db(using=self.tgt)


@pytest.fixture
def sides(live_server: Any, backend_pair: tuple[str, str], settings: Any) -> Sides:
    src, tgt = backend_pair
    settings.CHANGEFEED_SYNC_FEED_DATABASE = src  # what the live server serves
    Target.objects.using(src).create(name="regional", secrets=SECRET, row_filters=FILTERS)
    ds = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets=SECRET
    )
    return Sides(src, tgt, ds)


def seed(alias: str) -> None:
    Tag.objects.using(alias).create(slug="red")
    for code in ("fr", "de"):
        country = Country.objects.using(alias).create(code=code, name=code.upper())
        language = Language.objects.using(alias).create(country=country, code="l1")
        Copy.objects.using(alias).bulk_create(
            [
                Copy(language=language, key=f"k{k}", value=("pub " if k % 2 else "draft ") + code)
                for k in range(6)
            ]
        )


def change(alias: str) -> None:
    """Rows into and out of the filter, by every way capture sees a write."""
    copies = Copy.objects.using(alias)
    red = Tag.objects.using(alias).get(slug="red")
    one = copies.get(language__country__code="fr", key="k1")  # published
    one.value = "draft now"  # leaves
    one.save(using=alias)
    two = copies.get(language__country__code="fr", key="k2")  # draft
    two.value = "pub now"  # joins
    two.save(using=alias)
    three = copies.get(language__country__code="fr", key="k3")
    three.key = "k3-renamed"  # renamed inside the filter
    three.save(using=alias)
    three.tags.add(red)  # a many-to-many edit of a row inside
    copies.get(language__country__code="fr", key="k4").tags.add(red)  # ...and outside
    copies.filter(language__country__code="de", key__in=["k0", "k1"]).update(value="pub de2")
    five = copies.get(language__country__code="de", key="k5")
    five.value = "draft de"
    Copy.objects.using(alias).bulk_update([five], ["value"])  # leaves, in bulk
    copies.get(language__country__code="de", key="k3").delete()  # deleted while inside
    copies.get(language__country__code="de", key="k2").delete()  # deleted outside
    de = Language.objects.using(alias).get(country__code="de")
    Copy.objects.using(alias).create(language=de, key="new", value="pub new")
    Copy.objects.using(alias).create(language=de, key="hidden", value="secret draft")


@pytest.mark.parametrize("limit", [None, 2], ids=["one-page", "pages-of-2"])
def test_the_feed_keeps_a_filtered_target_equal_to_the_filtered_source(
    sides: Sides, limit: int | None
) -> None:
    seed(sides.src)
    sides.pull()
    assert state(sides.tgt) == expected(sides.src)
    change(sides.src)
    sides.follow(limit)
    assert state(sides.tgt) == expected(sides.src)
    values = {e["data"]["value"] for e in sides.seen if e["model"] == "testapp.copy" and e["data"]}
    assert values and all(v.startswith("pub") for v in values), values
    # Rows that were never inside: not even their keys reach the Target.
    keys = {tuple(e["key"]) for e in sides.seen}
    assert ("de", "l1", "hidden") not in keys and ("de", "l1", "k2") not in keys
    # Those that left came as deletes (by the key the target held).
    deleted = {tuple(e["key"]) for e in sides.seen if e["op"] == "delete"}
    assert deleted == {("fr", "l1", "k1"), ("de", "l1", "k3"), ("de", "l1", "k5")}


def test_a_changed_filter_asks_for_a_data_pull_then_the_feed_goes_on(sides: Sides) -> None:
    seed(sides.src)
    sides.pull()
    target = Target.objects.using(sides.src).get(name="regional")
    target.row_filters = {"testapp.copy": {"value__startswith": "draft"}}
    target.save(using=sides.src)
    Copy.objects.using(sides.src).filter(key="k0").update(value="draft again")
    with pytest.raises(FilterChanged, match="run a full Data Pull") as raised:
        sides.follow()
    assert isinstance(raised.value, CursorExpired)  # what followers already stop on
    FILTERS_NOW = {"testapp.copy": {"value__startswith": "draft"}}
    sides.pull()
    Copy.objects.using(sides.src).filter(key="k1").update(value="draft too")
    sides.follow()
    rows = Copy.objects.using(sides.src).filter(**FILTERS_NOW["testapp.copy"])
    assert set(Copy.objects.using(sides.tgt).values_list("key", "value")) == set(
        rows.values_list("key", "value")
    )


def test_an_event_written_without_routes_is_refused_not_guessed(db_alias: str) -> None:
    """An event of a filtered model that carries no route for the Target (written
    before its filters, by a relay, or by a writer that did not know them) raises
    FilterChanged rather than being sent or dropped."""
    from django.db import transaction

    from changefeed_sync import outbox

    target = Target.objects.using(db_alias).create(
        name="regional", secrets=SECRET, row_filters=FILTERS
    )
    routed = feed.Routed(routes.route_id(target), frozenset(FILTERS))
    since = feed.head(db_alias)
    with transaction.atomic(using=db_alias):
        outbox.write(
            db_alias, [outbox.make_event("testapp.tag", "upsert", ["t"], data={"slug": "t"})]
        )
    page = feed.read(since, 10, using=db_alias, routed=routed)  # an unfiltered model: as is
    assert [e["key"] for e in page.events] == [["t"]]
    with transaction.atomic(using=db_alias):
        outbox.write(
            db_alias,
            [outbox.make_event("testapp.copy", "upsert", ["fr", "l1", "x"], data={"value": "pub"})],
        )
    with pytest.raises(FilterChanged, match="was routed without this Target's current row"):
        feed.read(since, 10, using=db_alias, routed=routed)


@pytest.fixture(params=["postgres", "mariadb"])
def pushed(request: pytest.FixtureRequest) -> Any:
    """A filtered Target whose webhook is the target site's (another database), called
    in process by the loopback backend; it holds what the source held when its filters
    took effect (nothing), as after a Data Pull there."""
    from django.test import override_settings

    from changefeed_sync.source import push
    from changefeed_sync.source.delivery import loopback
    from tests.dbs import require_alias
    from tests.test_delivery_loopback import LOOPBACK, Webhook

    tgt = str(request.param)
    require_alias(tgt)
    with override_settings(
        CHANGEFEED_SYNC_TARGET_DATABASE=tgt, CHANGEFEED_SYNC_DELIVERY_BACKEND=LOOPBACK
    ):
        target = Target.objects.create(
            name="regional", secrets="pw", row_filters=FILTERS,
            webhook_url="http://target.invalid/sync/webhook/hq/",
        )  # fmt: skip
        routes.stamp(target, "default")
        Target.objects.filter(pk=target.pk).update(delivered_seq=target.filters_position)
        DataSource.objects.using(tgt).create(
            name="hq", url="http://source.invalid/sync/", client_name="regional",
            secrets="pw", checkpoint=target.filters_position,
        )  # fmt: skip
        push.forget_targets()
        received = Webhook()
        loopback.connect("regional", received)
        try:
            yield tgt, received
        finally:
            loopback.disconnect("regional")


def test_pushes_carry_only_what_the_filters_route(pushed: tuple[str, Any]) -> None:
    tgt, webhook = pushed
    seed("default")
    change("default")
    assert state(tgt) == expected("default")
    events = [e for body in webhook.bodies for e in body["events"]]
    values = {e["data"]["value"] for e in events if e["model"] == "testapp.copy" and e["data"]}
    assert values and all(v.startswith("pub") for v in values), values
    assert ["de", "l1", "hidden"] not in [e["key"] for e in events]
    assert {s for s, _ in webhook.statuses()} == {200}
