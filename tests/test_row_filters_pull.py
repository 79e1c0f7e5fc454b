"""Issue 14: a full Data Pull of a filtered Target makes it equal to the filtered source.

Real HTTP to a live server of this process, serving each database in turn as the
source (``CHANGEFEED_SYNC_FEED_DATABASE``), into another database as the target
(tests.dbs.BACKEND_PAIRS: SQLite -> PostgreSQL, PostgreSQL -> MariaDB, MariaDB ->
SQLite). What the target must hold is computed here from the filters with the ORM
(``Model.objects.filter(**lookups)``), not with what serves them. Files: a source
process with its own storage (tests/test_pull_files.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.core import signing
from django.db.models import Q

from changefeed_sync import registry
from changefeed_sync.exceptions import PullRefused
from changefeed_sync.models import DataSource, Target
from changefeed_sync.serialization import payloads_from_db
from changefeed_sync.signing import sign_request
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.follow import sync
from changefeed_sync.target.pull import digests, run_pull
from tests.helpers import state
from tests.test_pull import SourceProcess, documents, source_process  # noqa: F401 (fixtures)
from tests.test_pull_files import Site
from tests.testapp.models import Copy, Country, Document, Language, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(300),
]

SECRET = "filtered-target-secret"
IN = ["fr", "be"]
#: The issue's example: a row's own field (a copy is published) and a parent's, two
#: hops up (its language's country).
FILTERS: dict[str, dict[str, Any]] = {
    "testapp.country": {"code__in": IN},
    "testapp.language": {"country__code__in": IN},
    "testapp.copy": {"language__country__code__in": IN, "value__startswith": "pub"},
}
COUNTRIES = ["fr", "be", "de", "nl", "it", "es", "pt", "at", "ch", "dk"]


@dataclass
class Sides:
    src: str
    tgt: str
    ds: DataSource
    paths: list[str] = field(default_factory=list)

    def pull(self, **options: Any) -> dict[str, dict[str, int]]:
        """A Data Pull through a session that records the requests' paths."""
        self.paths.clear()
        session = requests.Session()
        session.hooks["response"].append(lambda r, *a, **k: self.paths.append(r.request.path_url))
        _, counts = run_pull(
            self.ds, using=self.tgt, client=SourceClient(self.ds, session), **options
        )
        return counts

    def requests_of(self, label: str) -> list[dict[str, list[str]]]:
        """The snapshot requests of this pull about ``label``, as their query parameters."""
        asked = [parse_qs(urlsplit(p).query) for p in self.paths if "/sync/snapshot/" in p]
        return [q for q in asked if q.get("model") == [label]]


@pytest.fixture
def sides(live_server: Any, backend_pair: tuple[str, str], settings: Any) -> Sides:
    src, tgt = backend_pair
    settings.CHANGEFEED_SYNC_FEED_DATABASE = src  # what the live server serves
    Target.objects.using(src).create(name="regional", secrets=SECRET, row_filters=FILTERS)
    ds = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets=SECRET
    )
    return Sides(src, tgt, ds)


def seed(alias: str, filler: int = 0) -> None:
    """Ten countries, two languages each, six copies per language (even keys published);
    ``filler`` more published copies in France that no test changes."""
    red = Tag.objects.using(alias).create(slug="red")
    for code in COUNTRIES:
        country = Country.objects.using(alias).create(code=code, name=code.upper())
        for lang in ("l1", "l2"):
            language = Language.objects.using(alias).create(country=country, code=lang)
            copies = [
                Copy(
                    language=language,
                    key=f"k{k}",
                    value=("pub " if k % 2 == 0 else "draft ") + code,
                )
                for k in range(6)
            ]
            if code == "fr" and lang == "l1":
                copies += [
                    Copy(language=language, key=f"f{i:03}", value="pub") for i in range(filler)
                ]
            Copy.objects.using(alias).bulk_create(copies)
    for copy in Copy.objects.using(alias).filter(key="k0"):
        copy.tags.add(red)


def expected(alias: str) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """What a target of the filters must hold: ``state()`` of the rows the ORM selects."""
    out = {}
    for options in registry.all_options():
        rows = options.model._base_manager.using(alias).filter(**FILTERS.get(options.label, {}))
        payloads = payloads_from_db(options, list(rows.values_list("pk", flat=True)), alias)
        out[options.label] = {tuple(p["key"]): p["data"] for p in payloads.values()}
    return out


def test_a_filtered_pull_copies_exactly_the_filtered_rows(sides: Sides) -> None:
    seed(sides.src)
    counts = sides.pull()
    assert state(sides.tgt) == expected(sides.src)
    copies = set(Copy.objects.using(sides.tgt).values_list("language__country__code", "value"))
    assert copies == {("fr", "pub fr"), ("be", "pub be")}
    assert Copy.objects.using(sides.tgt).count() == 12 < Copy.objects.using(sides.src).count()
    assert counts["testapp.copy"]["created"] == 12
    assert Tag.objects.using(sides.tgt).count() == 1  # an unfiltered model: every row
    # The pull hands over a position, from which the feed goes on.
    sides.ds.refresh_from_db(using=sides.tgt)
    assert sides.ds.checkpoint > 0
    move_rows(sides.src)
    sync(sides.ds, using=sides.tgt)
    assert state(sides.tgt) == expected(sides.src)


def move_rows(alias: str) -> None:
    """Rows moving into and out of the filters, through the row and through a parent."""
    with_code = Copy.objects.using(alias).filter
    with_code(language__country__code="fr", language__code="l2", key="k1").update(value="pub now")
    with_code(language__country__code="fr", language__code="l2", key="k2").update(value="draft")
    fr = Country.objects.using(alias).get(code="fr")
    nl = Country.objects.using(alias).get(code="nl")
    # A German language now French (its published copies come in), a Belgian one now
    # Dutch (its copies go): through the copies' parent.
    Language.objects.using(alias).filter(country__code="de", code="l1").update(
        country=fr, code="l3"
    )
    Language.objects.using(alias).filter(country__code="be", code="l2").update(
        country=nl, code="l3"
    )
    # A field two hops up in the copies' path: Italy becomes "be"... after Belgium left it.
    Country.objects.using(alias).filter(code="be").update(code="bx")
    Country.objects.using(alias).filter(code="it").update(code="be")


@pytest.mark.parametrize("mode", ["rows", "digests"])
def test_a_repull_follows_rows_into_and_out_of_the_filters(sides: Sides, mode: str) -> None:
    # digests: a bucket a row, and rows that do not change, so that only the buckets
    # that differ travel; rows: one bucket, which differs, so every row travels.
    seed(sides.src, filler=120 if mode == "digests" else 0)
    per_bucket = 1 if mode == "digests" else 10**9
    with mock.patch.object(digests, "ROWS_PER_BUCKET", per_bucket):
        sides.pull()
        assert state(sides.tgt) == expected(sides.src)
        move_rows(sides.src)
        counts = sides.pull(allow_mass_delete=True)
    assert state(sides.tgt) == expected(sides.src)
    codes = set(Copy.objects.using(sides.tgt).values_list("language__country__code", flat=True))
    assert codes == {"fr", "be"}
    assert Copy.objects.using(sides.tgt).filter(language__code="l3").count() == 3
    asked = sides.requests_of("testapp.copy")
    if mode == "digests":
        # Compared by the source's digests of its filtered rows, then only the rows of
        # the buckets that differ: the filler stayed, unchanged and untransferred.
        assert any("digest" in q for q in asked)
        assert all("only" in q for q in asked if "digest" not in q)
        assert counts["testapp.copy"]["unchanged"] >= 120
    else:
        assert not any("only" in q for q in asked)  # its one bucket differed: every row


def test_an_unchanged_repull_compares_only_digests_of_the_filtered_rows(sides: Sides) -> None:
    """The snapshot's counts and digests are the filtered ones: the target, with a
    tenth of the source's rows, compares digests (with the source's whole tables counted
    it would pull every row again), and finds no bucket to transfer."""
    seed(sides.src)
    sides.pull()
    counts = sides.pull()
    for label in ("testapp.country", "testapp.language", "testapp.copy"):
        asked = sides.requests_of(label)
        assert asked and all("digest" in q for q in asked), (label, asked)
    assert counts["testapp.copy"] == {"created": 0, "updated": 0, "deleted": 0, "unchanged": 12}
    assert state(sides.tgt) == expected(sides.src)


def test_the_mass_delete_guard_counts_the_filtered_rows(sides: Sides) -> None:
    """7 of the 12 copies the target holds leave its filters: refused, though that is 7
    of the source's 120 copies."""
    seed(sides.src)
    sides.pull()
    before = state(sides.tgt)
    Country.objects.using(sides.src).filter(code="be").update(code="bx")  # 6 copies
    Copy.objects.using(sides.src).filter(
        language__country__code="fr", key="k0", language__code="l1"
    ).update(value="draft")
    assert Copy.objects.using(sides.src).count() == 120
    with pytest.raises(PullRefused, match=r"delete 7 of 12 rows of testapp\.copy"):
        sides.pull()
    assert state(sides.tgt) == before
    sides.pull(allow_mass_delete=True)
    assert state(sides.tgt) == expected(sides.src)
    assert Copy.objects.using(sides.tgt).count() == 5


# --------------------------------------------------------------------------- files

PUBLISHED = {"testapp.document": {"slug__startswith": "pub"}}


@pytest.fixture
def site(source_process: SourceProcess, tmp_path: Path, settings: Any) -> Iterator[Site]:  # noqa: F811
    settings.MEDIA_ROOT = str(tmp_path / "target-media")
    Target.objects.using("postgres").filter(name="t").update(row_filters=PUBLISHED)
    yield Site(source_process, tmp_path)


def test_a_filtered_pull_transfers_only_the_files_of_its_rows(site: Site) -> None:
    site.write("docs/pub.txt", b"published")
    site.write("docs/draft.txt", b"not yet")
    site.row("pub-a", "docs/pub.txt")
    site.row("draft-b", "docs/draft.txt")
    counts = site.pull()
    assert counts["files_fetched"] == 1 and len(site.file_requests()) == 1
    assert site.target_files() == {"docs/pub.txt": b"published"}
    assert list(Document.objects.values_list("slug", flat=True)) == ["pub-a"]


def test_a_filtered_target_downloads_only_files_its_rows_name_now(site: Site) -> None:
    site.write("docs/pub.txt", b"published")
    site.write("docs/draft.txt", b"not yet")
    site.row("pub-a", "docs/pub.txt")
    site.row("draft-b", "docs/draft.txt")
    base = site.process.url.removesuffix("/sync/")

    def get(path: str) -> requests.Response:
        headers = {"Authorization": sign_request("t", ["pw"], "GET", path)}
        return requests.get(base + path, headers=headers, timeout=10)

    def download(token: str) -> requests.Response:
        return get("/sync/files/?" + requests.compat.urlencode({"t": token}))

    page = get("/sync/snapshot/?model=testapp.document").json()
    assert [row["key"] for row in page["rows"]] == [["pub-a"]]
    token = page["rows"][0]["files"]["attachment"]["token"]
    assert download(token).content == b"published"

    # A token the source signed for this Target (as before it had filters, or before
    # tokens named their row) of a file no row inside its filters names: refused.
    def signed(name: str, key: list[str] | None) -> str:
        claims: dict[str, Any] = {"m": "testapp.document", "f": "attachment", "n": name, "t": "t"}
        if key is not None:
            claims["k"] = key
        return signing.dumps(
            claims,
            key="changefeed-sync-e2e-not-a-secret",
            salt="changefeed_sync.files.v1",
            compress=True,
        )

    for refused in (
        download(signed("docs/draft.txt", None)),
        download(signed("docs/draft.txt", ["draft-b"])),
    ):
        assert refused.status_code == 404, refused.text
        assert refused.json()["code"] == "file_outside_filter"
        assert "not yet" not in refused.text
    # Without a key, a file a row inside the filters names is served.
    assert download(signed("docs/pub.txt", None)).content == b"published"
    # Its row leaves the filters: the token listed for it no longer works.
    Document.objects.using("postgres").filter(slug="pub-a").update(slug="draft-a")
    gone = download(token)
    assert gone.status_code == 404 and gone.json()["code"] == "file_outside_filter"
    # POST files/ (an increment's files) describes it as a row gone.
    body = b'{"protocol": 1, "files": [{"model": "testapp.document", "key": ["draft-a"], "field": "attachment", "name": "docs/pub.txt"}]}'
    path = "/sync/files/"
    headers = {
        "Authorization": sign_request("t", ["pw"], "POST", path, body),
        "Content-Type": "application/json",
    }
    described = requests.post(base + path, data=body, headers=headers, timeout=10)
    assert described.json()["files"] == [{"status": "superseded"}]


def test_a_filter_over_a_parent_path_is_a_join_on_the_parent_keys(sides: Sides) -> None:
    """The filter is the database's: the page query carries it (no row outside it is
    read and dropped here)."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from changefeed_sync.selection import Selection
    from changefeed_sync.source import snapshot

    seed(sides.src)
    target = Target.objects.using(sides.src).get(name="regional")
    selection = Selection.of(target)
    assert isinstance(selection.rows_filter("testapp.copy"), Q)
    with CaptureQueriesContext(connections[sides.src]) as captured:
        page = snapshot.page("testapp.copy", None, 1000, sides.src, selection=selection)
    assert len(page["rows"]) == 12
    # The first query is the page's keyset: the filter, its joins, the order, the limit.
    query = captured.captured_queries[0]["sql"]
    assert "testapp_country" in query and "ORDER BY" in query and "LIMIT" in query.upper()
