"""Issue 14: a regional relay with a filtered target of its own, A -> B filtered -> C
filtered further, through real HTTP.

B is a target of A (its Target on A has row filters) and a source for C (its Target on
B filters further); B relays (it has an active Target), so its pull writes events too.
One live server of this process serves A, then B (``CHANGEFEED_SYNC_FEED_DATABASE``),
each request signed by the Target of the site it serves. Each backend is A, B and C
once (SQLite, PostgreSQL, MariaDB in turn). What B and C must hold is computed on A
with the ORM (``Model.objects.filter(**lookups)`` of both sets of filters), never with
what serves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from changefeed_sync import registry
from changefeed_sync.exceptions import FilterChanged
from changefeed_sync.models import DataSource, Target
from changefeed_sync.serialization import payloads_from_db
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.follow import sync
from changefeed_sync.target.pull import digests, run_pull
from tests.dbs import LABELS, require_alias
from tests.helpers import events, state
from tests.testapp.models import Copy, Country, Language, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(300),
]

SECRET = "relay-secret"
Filters = dict[str, dict[str, Any]]


def through_parents(codes: list[str], **copy: Any) -> Filters:
    """Countries by code, their languages and copies through the parents' path."""
    return {
        "testapp.country": {"code__in": codes},
        "testapp.language": {"country__code__in": codes},
        "testapp.copy": {"language__country__code__in": codes, **copy},
    }


#: B's filters on A: three countries of ten.
FOR_B = through_parents(["fr", "be", "de"])
#: C's filters on B: two of those, and only the published copies (a row's own field).
FOR_C = through_parents(["fr", "be"], value__startswith="pub")
COUNTRIES = ["fr", "be", "de", "nl", "it", "es", "pt", "at", "ch", "dk"]
FILLER = 200

#: (A, B, C): each backend once in each role.
CHAINS = [("default", "postgres", "mariadb"), ("postgres", "mariadb", "default"),
          ("mariadb", "default", "postgres")]  # fmt: skip


@dataclass
class Relay:
    a: str
    b: str
    c: str
    b_of_a: DataSource  # A, as B knows it
    c_of_b: DataSource  # B, as C knows it
    settings: Any

    paths: list[str] = field(default_factory=list)

    def pull_b(self) -> dict[str, dict[str, int]]:
        self.settings.CHANGEFEED_SYNC_FEED_DATABASE = self.a
        return self._pull(self.b_of_a, self.b)

    def pull_c(self) -> dict[str, dict[str, int]]:
        self.settings.CHANGEFEED_SYNC_FEED_DATABASE = self.b
        return self._pull(self.c_of_b, self.c)

    def _pull(self, ds: DataSource, using: str) -> dict[str, dict[str, int]]:
        """A Data Pull through a session that records the requests' paths."""
        self.paths.clear()
        session = requests.Session()
        session.hooks["response"].append(lambda r, *a, **k: self.paths.append(r.request.path_url))
        client = SourceClient(ds, session)
        _, counts = run_pull(ds, using=using, client=client, allow_mass_delete=True)
        return counts

    def asked_for_buckets(self, label: str) -> bool:
        """Whether the last pull fetched rows of ``label`` by buckets (after digests)."""
        asked = [parse_qs(urlsplit(p).query) for p in self.paths if "/sync/snapshot/" in p]
        return any(q.get("model") == [label] and "only" in q for q in asked)


@pytest.fixture(params=CHAINS, ids=["-".join(LABELS[a] for a in chain) for chain in CHAINS])
def relay(request: pytest.FixtureRequest, live_server: Any, settings: Any) -> Relay:
    a, b, c = request.param
    for alias in (a, b, c):
        require_alias(alias)
    url = live_server.url + "/sync/"
    Target.objects.using(a).create(name="b", secrets=SECRET, row_filters=FOR_B)
    Target.objects.using(b).create(name="c", secrets=SECRET, row_filters=FOR_C)
    b_of_a = DataSource.objects.using(b).create(name="a", url=url, client_name="b", secrets=SECRET)
    c_of_b = DataSource.objects.using(c).create(name="b", url=url, client_name="c", secrets=SECRET)
    return Relay(a, b, c, b_of_a, c_of_b, settings)


def seed(alias: str) -> None:
    """Ten countries, two languages each, four copies per language (even keys published),
    and published copies in France that nothing changes (so that a re-pull by digests
    finds few buckets differ and fetches those only)."""
    red = Tag.objects.using(alias).create(slug="red")
    for code in COUNTRIES:
        country = Country.objects.using(alias).create(code=code, name=code.upper())
        for lang in ("l1", "l2"):
            language = Language.objects.using(alias).create(country=country, code=lang)
            Copy.objects.using(alias).bulk_create(
                Copy(
                    language=language,
                    key=f"k{k}",
                    value=("pub " if k % 2 == 0 else "draft ") + code,
                )
                for k in range(4)
            )
    filler = Language.objects.using(alias).get(country__code="fr", code="l1")
    Copy.objects.using(alias).bulk_create(
        Copy(language=filler, key=f"f{i:03}", value="pub") for i in range(FILLER)
    )
    for copy in Copy.objects.using(alias).filter(key="k0"):
        copy.tags.add(red)


def expected(alias: str, *filters: Filters) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """``state()`` of the rows of ``alias`` that every one of ``filters`` selects."""
    out = {}
    for options in registry.all_options():
        rows = options.model._base_manager.using(alias).all()
        for lookups in filters:
            rows = rows.filter(**lookups.get(options.label, {}))
        payloads = payloads_from_db(options, list(rows.values_list("pk", flat=True)), alias)
        out[options.label] = {tuple(p["key"]): p["data"] for p in payloads.values()}
    return out


def assert_relayed(r: Relay) -> None:
    assert state(r.b) == expected(r.a, FOR_B)
    assert state(r.c) == expected(r.a, FOR_B, FOR_C)


def change(alias: str) -> None:
    """Rows moving into and out of B's and C's filters, through the row and through a
    parent, natural keys renamed, rows deleted and created; all through the ORM."""
    copies = Copy.objects.using(alias)
    # A copy's own field: one published (into C), one unpublished (out of C, not of B).
    copies.filter(language__country__code="fr", language__code="l1", key="k1").update(
        value="pub now"
    )
    copies.filter(language__country__code="fr", language__code="l1", key="k2").update(value="draft")
    # Through the copies' parent: a Dutch language now French (into B and C), a German
    # one now French (from B only into C too), a Belgian one now Dutch (out of both).
    fr, nl, be = (Country.objects.using(alias).get(code=c) for c in ("fr", "nl", "be"))
    languages = Language.objects.using(alias)
    languages.filter(country=nl, code="l1").update(country=fr, code="l3")
    languages.filter(country__code="de", code="l1").update(country=fr, code="l4")
    languages.filter(country=be, code="l2").update(country=nl, code="l3")
    # Renames of natural keys: a language (its copies' keys), a copy, and a country two
    # hops up the copies' path: Belgium leaves ("be" -> "bx"), Italy becomes "be".
    languages.filter(country=fr, code="l2").update(code="l9")
    copies.filter(language__country=fr, language__code="l9", key="k0").update(key="k0-renamed")
    Country.objects.using(alias).filter(code="be").update(code="bx")
    Country.objects.using(alias).filter(code="it").update(code="be")
    # Deletes: a copy C has; Germany, in B only, with its language and copies (cascade).
    # Creates inside and outside the filters.
    copies.filter(language__country=fr, language__code="l1", key="k0").delete()
    Country.objects.using(alias).filter(code="de").delete()
    language = Language.objects.using(alias).get(country__code="be", code="l1")  # Italy's
    Copy.objects.using(alias).create(language=language, key="new", value="pub new")
    Copy.objects.using(alias).create(language=language, key="new-draft", value="draft new")
    Country.objects.using(alias).create(code="xx", name="outside")


@pytest.mark.parametrize("compare", ["rows", "digests"])
def test_a_relay_passes_on_its_filtered_rows_filtered_further(relay: Relay, compare: str) -> None:
    # digests: a bucket a row, so that a re-pull compares and fetches bucket by bucket;
    # rows: one bucket, which differs, so every row travels again.
    per_bucket = 1 if compare == "digests" else 10**9
    seed(relay.a)
    with mock.patch.object(digests, "ROWS_PER_BUCKET", per_bucket):
        relay.pull_b()
        relay.pull_c()
        assert_relayed(relay)
        # What the filters leave: B three countries of ten, C two, published copies only.
        assert Copy.objects.using(relay.b).count() == 3 * 2 * 4 + FILLER
        assert set(Copy.objects.using(relay.c).values_list("language__country__code", "value")) == {
            ("fr", "pub fr"),
            ("fr", "pub"),
            ("be", "pub be"),
        }
        # B is a relay: its pull wrote events of the rows it wrote, and only of those.
        assert {e.model for e in events(relay.b)} >= {"testapp.country", "testapp.copy"}
        assert not any(e.key[0] not in ("fr", "be", "de") for e in events(relay.b)
                       if e.model == "testapp.copy")  # fmt: skip

        change(relay.a)
        b_counts = relay.pull_b()
        c_counts = relay.pull_c()
    assert_relayed(relay)
    if compare == "digests":  # the last pull (C's) fetched only the buckets that differ
        assert relay.asked_for_buckets("testapp.copy")
        assert c_counts["testapp.copy"]["unchanged"] >= FILLER
    assert b_counts["testapp.copy"]["deleted"] > 0 and b_counts["testapp.copy"]["created"] > 0
    assert c_counts["testapp.copy"]["deleted"] > 0 and c_counts["testapp.copy"]["created"] > 0
    assert set(Country.objects.using(relay.c).values_list("code", "name")) == {
        ("fr", "FR"),
        ("be", "IT"),
    }
    published = set(
        Copy.objects.using(relay.c).values_list("language__country__code", "language__code", "key")
    )
    assert {("fr", "l3", "k0"), ("fr", "l4", "k2")} <= published  # in through a parent
    assert {("fr", "l9", "k0-renamed"), ("be", "l1", "new"), ("be", "l2", "k0")} <= published
    assert ("fr", "l1", "k1") in published and ("fr", "l1", "k2") not in published  # own field
    assert ("fr", "l1", "k0") not in published  # deleted
    # C follows B's feed: caught up, nothing to apply. B relays what it applies without
    # routing it for its own filtered Targets yet: when it relays more, C is asked for
    # a Data Pull (410 filter_changed) rather than sent rows outside its filters.
    relay.settings.CHANGEFEED_SYNC_FEED_DATABASE = relay.b
    assert sync(relay.c_of_b, using=relay.c).stats.events == 0
    Copy.objects.using(relay.a).filter(value__startswith="pub").update(value="pub, relayed")
    relay.pull_b()
    relay.settings.CHANGEFEED_SYNC_FEED_DATABASE = relay.b
    with pytest.raises(FilterChanged, match="run a full Data Pull"):
        sync(relay.c_of_b, using=relay.c)
