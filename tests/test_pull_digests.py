"""Re-pulls by digest: only the rows of buckets that differ travel, and the result is
still an exact copy with exact counts.

Real servers and databases as in tests/test_pull.py: the ``source`` fixture serves
this process's SQLite database to a PostgreSQL or MariaDB target; ``source_process``
serves PostgreSQL to this process's SQLite database. Every snapshot response the
target receives is recorded (a response hook of the real requests session it pulls
with), so the rows that travelled can be counted.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import pytest
import requests

import changefeed_sync.rows
from changefeed_sync import registry
from changefeed_sync.digests import (
    MAX_BUCKETS,
    DigestPage,
    DigestReader,
    _texts_of,
    bucket_of,
    canonical_key,
    decode_buckets,
    encode_buckets,
)
from changefeed_sync.exceptions import PullRefused
from changefeed_sync.models import DataSource, Target
from changefeed_sync.signing import sign_request
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.pull import digests as pull_digests
from changefeed_sync.target.pull import run_pull
from tests import test_pull
from tests.dbs import require_alias
from tests.helpers import state
from tests.test_pull import PullBin, PullPart, SourceProcess, _seed
from tests.testapp.models import Category, Copy, Country, Kinds, Language, Tag

# The fixtures of tests/test_pull.py: its sources and targets.
documents = test_pull.documents
parts = test_pull.parts
source = test_pull.source
source_process = test_pull.source_process
tgt = test_pull.tgt

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(180),
]

ALL_UNCHANGED = {"created": 0, "updated": 0, "deleted": 0}


class Recorder:
    """A requests session that keeps, per snapshot response, its query and its rows."""

    def __init__(self) -> None:
        self.session = requests.Session()
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.session.hooks["response"].append(self._record)

    def _record(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if "/snapshot/" in response.request.path_url and response.status_code == 200:
            self.seen.append((response.request.path_url, response.json()))

    def pull(self, ds: DataSource, using: str, **options: Any) -> dict[str, dict[str, int]]:
        self.seen.clear()
        _, counts = run_pull(ds, using=using, client=SourceClient(ds, self.session), **options)
        return counts

    def rows(self, label: str | None = None) -> list[list[Any]]:
        """Keys of the full rows received (of one model)."""
        return [
            row["key"]
            for _, body in self.seen
            for row in body.get("rows", [])
            if label is None or body.get("model") == label
        ]

    def digest_requests(self) -> list[str]:
        return [path for path, _ in self.seen if "digest=" in path]


@pytest.fixture
def small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows per bucket: the small tables here get many buckets, so that a few
    changes leave most of them equal (the pull's default is 8 rows per bucket)."""
    monkeypatch.setattr(pull_digests, "ROWS_PER_BUCKET", 2)


def _kinds() -> None:
    tz = datetime.timezone(datetime.timedelta(hours=-3))
    Kinds.objects.create(
        slug="all", big=2**62 + 1, dec=decimal.Decimal("-0.000100"),
        when=datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=tz),
        day=datetime.date(1999, 12, 31), uid=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        blob=b"\x00\xffbinary", doc={"z": [1, 2.5, {"b": None}], "a": "\u00e9\u4e2d", "m": True},
        flag=True, ratio=0.1, span=datetime.timedelta(days=2, microseconds=7), color="blue",
    )  # fmt: skip
    Kinds.objects.create(slug="empty")
    Kinds.objects.create(slug="caf\u00e9-\u2603", big=-(2**53), ratio=-1e300, doc=[])


def test_repull_with_nothing_changed_transfers_no_rows(source: DataSource, tgt: str) -> None:
    """Every model here compared by digests, equal across backends (the source is
    SQLite, the target PostgreSQL or MariaDB): not one full row travels."""
    _seed(countries=4, keys=30)
    _kinds()
    recorder = Recorder()
    first = recorder.pull(source, tgt)
    assert len(recorder.rows("testapp.copy")) == 120
    assert not recorder.digest_requests()  # an empty target asks for rows straight away
    counts = recorder.pull(source, tgt)
    assert recorder.rows() == []
    for label, c in counts.items():
        assert c == {**ALL_UNCHANGED, "unchanged": first[label]["created"]}, label
    assert counts["testapp.copy"]["unchanged"] == 120
    assert counts["testapp.kinds"]["unchanged"] == 3
    digested = {body["model"] for _, body in recorder.seen if isinstance(body.get("digests"), list)}
    # Every model with rows (a model empty on both sides has nothing to compare).
    assert digested == {o.label for o in registry.all_options() if first[o.label]["created"]}
    assert state(tgt) == state("default")


def test_repull_fixes_exactly_the_rows_that_changed(
    source: DataSource, tgt: str, small_buckets: None, settings: Any
) -> None:
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 7  # several pages per request and model
    _seed(countries=4, keys=30)
    recorder = Recorder()
    recorder.pull(source, tgt)
    c1 = Language.objects.get(country__code="c1")
    Copy.objects.filter(language=c1, key="k3").update(value="new value")  # one field
    Copy.objects.create(language=c1, key="k-new", value="inserted")  # an insert
    Copy.objects.filter(language=c1, key="k4").delete()  # a delete
    Copy.objects.filter(language=c1, key="k5").update(key="k5-renamed")  # a key renamed
    Copy.objects.get(language=c1, key="k6").tags.add(Tag.objects.create(slug="blue"))  # M2M
    Category.objects.filter(slug="kid").update(parent=Category.objects.create(slug="root2"))
    Country.objects.filter(code="c2").update(name="Renamed")
    changed_copies = {("c1", "xx", k) for k in ("k3", "k-new", "k5-renamed", "k6")}

    preview = recorder.pull(source, tgt, dry_run=True)
    assert state(tgt) != state("default")
    counts = recorder.pull(source, tgt)
    assert counts == preview  # a dry run counts exactly what a pull does
    assert counts["testapp.copy"] == {"created": 2, "updated": 2, "deleted": 2, "unchanged": 116}
    assert counts["testapp.tag"] == {"created": 1, "updated": 0, "deleted": 0, "unchanged": 1}
    assert counts["testapp.category"] == {"created": 1, "updated": 1, "deleted": 0, "unchanged": 1}
    assert counts["testapp.country"] == {"created": 0, "updated": 1, "deleted": 0, "unchanged": 3}
    assert state(tgt) == state("default")
    # Only rows of the buckets that differ travelled: the changed ones and a few neighbours.
    received = {tuple(k) for k in recorder.rows("testapp.copy")}
    assert changed_copies <= received
    assert len(received) < 40  # at most 6 of 60 buckets, of about 2 rows each
    # And the next re-pull finds nothing to do.
    counts = recorder.pull(source, tgt)
    assert recorder.rows() == []
    assert counts["testapp.copy"] == {**ALL_UNCHANGED, "unchanged": 120}


def test_foreign_keys_outside_the_key_and_keys_through_a_to_field(
    parts: None, source: DataSource, tgt: str, small_buckets: None
) -> None:
    """The join-free reader's path: integer keys, a key through a to_field foreign key,
    a nullable foreign key outside the key, decimals."""
    bins = [PullBin.objects.create(number=n * 7, label=f"bin {n}") for n in range(4)]
    for i in range(40):
        PullPart.objects.create(
            bin=bins[i % 4], serial=i, spare=bins[(i + 1) % 4] if i % 3 else None,
            weight=decimal.Decimal(i) / 8,
        )  # fmt: skip
    recorder = Recorder()
    recorder.pull(source, tgt)
    recorder.pull(source, tgt)
    assert recorder.rows() == []
    PullPart.objects.filter(serial=4).update(spare=bins[0])  # a foreign key changed
    PullPart.objects.filter(serial=5).update(spare=None)
    PullPart.objects.filter(serial=9).update(weight=decimal.Decimal("9.5"))
    counts = recorder.pull(source, tgt)
    assert counts["testapp.pullpart"] == {**ALL_UNCHANGED, "updated": 3, "unchanged": 37}
    assert {(7 * (s % 4), s) for s in (4, 5, 9)} <= {tuple(k) for k in recorder.rows()}
    assert len(recorder.rows()) < 20
    assert state(tgt) == state("default")


def test_references_to_rows_read_later_in_the_buckets_that_differ(
    source: DataSource, tgt: str, small_buckets: None, settings: Any
) -> None:
    """A row of a differing bucket pointing at a row created later (higher primary key,
    a later page): written null, then set by the second pass, which asks for the same
    buckets only."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 2
    root = Category.objects.create(slug="root")
    for i in range(40):
        Category.objects.create(slug=f"c{i}", parent=root)
    recorder = Recorder()
    recorder.pull(source, tgt)
    late = Category.objects.create(slug="late")  # the highest primary key
    Category.objects.filter(slug="c3").update(parent=late)
    counts = recorder.pull(source, tgt)
    assert counts["testapp.category"] == {**ALL_UNCHANGED, "created": 1, "updated": 1,
                                          "unchanged": 40}  # fmt: skip
    received = [tuple(k) for k in recorder.rows("testapp.category")]
    assert ("c3",) in received and ("late",) in received
    assert len(received) < 2 * 20  # both passes together, a few buckets each
    assert any("buckets=" in path for path, _ in recorder.seen)
    assert state(tgt) == state("default")


def test_keep_missing_and_deletes_by_digest(
    source: DataSource, tgt: str, small_buckets: None
) -> None:
    _seed(countries=2, keys=30)
    recorder = Recorder()
    recorder.pull(source, tgt)
    Copy.objects.filter(key__in=["k1", "k2"]).delete()  # 4 rows
    counts = recorder.pull(source, tgt, keep_missing=True)
    assert counts["testapp.copy"] == {**ALL_UNCHANGED, "unchanged": 56}
    assert Copy.objects.using(tgt).count() == 60
    assert len(recorder.rows("testapp.copy")) < 30
    counts = recorder.pull(source, tgt, dry_run=True)
    assert counts["testapp.copy"] == {**ALL_UNCHANGED, "deleted": 4, "unchanged": 56}
    assert Copy.objects.using(tgt).count() == 60
    counts = recorder.pull(source, tgt)
    assert counts["testapp.copy"] == {**ALL_UNCHANGED, "deleted": 4, "unchanged": 56}
    assert state(tgt) == state("default")


def test_most_rows_different_pulls_every_row(
    source: DataSource, tgt: str, small_buckets: None
) -> None:
    """When more than a quarter of the buckets differ, the model is pulled in full
    (and the mass-delete guard sees the whole table, as without digests)."""
    _seed(countries=2, keys=30)
    recorder = Recorder()
    recorder.pull(source, tgt)
    Copy.objects.filter(key__in=[f"k{i}" for i in range(0, 30, 2)]).update(value="changed")
    counts = recorder.pull(source, tgt)
    assert counts["testapp.copy"] == {**ALL_UNCHANGED, "updated": 30, "unchanged": 30}
    assert len(recorder.rows("testapp.copy")) == 60
    assert state(tgt) == state("default")
    Copy.objects.filter(key__in=[f"k{i}" for i in range(20)]).delete()
    with pytest.raises(PullRefused, match="40 of 60 rows of testapp.copy"):
        recorder.pull(source, tgt)


class OldSourceClient(SourceClient):
    """What a target sees of a source from before digests: no ``digests`` in the
    snapshot's start (the source itself is the real one)."""

    def get_json(self, endpoint: str, params: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        body = super().get_json(endpoint, params, timeout=timeout)
        if endpoint == "snapshot/" and not params:
            body.pop("digests")
        return body


def test_a_source_without_digests_gets_full_pages(source: DataSource, tgt: str) -> None:
    _seed()
    recorder = Recorder()
    recorder.pull(source, tgt)
    Copy.objects.filter(key="k0").update(value="new")
    recorder.seen.clear()
    _, counts = run_pull(source, using=tgt, client=OldSourceClient(source, recorder.session))
    assert counts["testapp.copy"] == {**ALL_UNCHANGED, "updated": 3, "unchanged": 12}
    assert not recorder.digest_requests()
    assert len(recorder.rows("testapp.copy")) == 15
    assert state(tgt) == state("default")


def test_postgres_source_to_sqlite_target(
    source_process: SourceProcess, small_buckets: None
) -> None:
    """The other direction: a source process on PostgreSQL, this SQLite database."""
    _seed(countries=3, keys=20, using="postgres")
    ds = DataSource.objects.create(name="p", url=source_process.url, client_name="t", secrets="pw")
    recorder = Recorder()
    recorder.pull(ds, "default")
    counts = recorder.pull(ds, "default")
    assert recorder.rows() == [] and counts["testapp.copy"]["unchanged"] == 60
    Copy.objects.using("postgres").filter(key="k7").update(value="x")
    Copy.objects.using("postgres").filter(key="k8").delete()
    counts = recorder.pull(ds, "default")
    assert counts["testapp.copy"] == {"created": 0, "updated": 3, "deleted": 3, "unchanged": 54}
    assert len(recorder.rows("testapp.copy")) < 30
    assert state("default") == state("postgres")


# --------------------------------------------------------------------------- the digests


@pytest.mark.parametrize("alias", ["default", "postgres", "mariadb"])
def test_digests_are_those_of_the_payloads(
    parts: None, alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The column-wise texts of the join-free reader are exactly the canonical texts of
    the payloads the feed sends (serialization.payloads_from_db), on every backend;
    read in chunks of three rows, page by page or all at once."""
    require_alias(alias)
    monkeypatch.setattr(changefeed_sync.rows, "_READ_CHUNK", 3)
    _seed(using=alias)
    Kinds.objects.using(alias).create(
        slug="k", big=2**60, dec=decimal.Decimal("1.5"), doc={"x": [1]}
    )
    Kinds.objects.using(alias).create(slug="n")
    Category.objects.using(alias).create(slug="orphan")
    bins = [PullBin.objects.using(alias).create(number=n) for n in range(3)]
    PullPart.objects.using(alias).create(bin=bins[0], serial=1, spare=bins[2])
    PullPart.objects.using(alias).create(bin=bins[1], serial=1)
    from changefeed_sync.serialization import payloads_from_db

    for options in registry.all_options():
        pks = list(
            options.model._base_manager.using(alias).order_by("pk").values_list("pk", flat=True)
        )
        expected = DigestPage(7)
        payloads = payloads_from_db(options, pks, alias)
        expected.add(*_texts_of([payloads[pk] for pk in pks]))
        reader = DigestReader(options, alias)
        got = reader.digest_page(None, 1000, 7)
        assert (got.counts, got.sums) == (expected.counts, expected.sums), options.label
        assert sum(got.counts) == len(pks)
        assert not got.more and got.last == (pks[-1] if pks else None)
        got = reader.digest_all(7)
        assert (got.counts, got.sums) == (expected.counts, expected.sums), options.label
        for size in (2, 3, 4, 7):  # rows per page: within a chunk, one, more than one
            paged, after = DigestPage(7), None
            while True:
                reader.digest_page(after, size, 7, paged)
                if not paged.more:
                    break
                after = str(paged.last)
            assert (paged.counts, paged.sums) == (expected.counts, expected.sums), options.label
        # The rows of some buckets, and this site's primary keys of them.
        wanted = frozenset({1, 3, 4})
        rows, _, more = reader.page_in_buckets(None, 1000, 7, wanted)
        assert not more
        keys = {
            tuple(p["key"])
            for p in payloads.values()
            if bucket_of(canonical_key(p["key"]), 7) in wanted
        }
        assert {tuple(r["key"]) for r in rows} == keys
        for size in (1, 2, 4):  # a request stops at about ``size`` rows, or 10 * size read
            found, after, more = [], None, True
            while more:
                rows, after, more = reader.page_in_buckets(after, size, 7, wanted)
                assert len(rows) < 2 * size + 3
                found += [tuple(r["key"]) for r in rows]
            assert sorted(found) == sorted(keys), (options.label, size)
        in_buckets = [pk for chunk in reader.pks_in_buckets(7, wanted) for pk in chunk]
        assert sorted({tuple(payloads[pk]["key"]) for pk in in_buckets}) == sorted(keys)
        assert len(in_buckets) == len(keys)


def test_canonical_text_and_bucket_bitmap() -> None:
    page = DigestPage(3)
    page.add(['["a"]'], ['[["a"],{"n":1}]'])
    assert page.to_wire() == [[bucket_of('["a"]', 3), 1, page.to_wire()[0][2]]]
    assert len(page.to_wire()[0][2]) == 32
    other = DigestPage(3)
    other.merge(page.to_wire())
    assert other.differing(page) == []
    other.add(['["b"]'], ['[["b"],{}]'])
    assert other.differing(page) == [bucket_of('["b"]', 3)]
    for wanted in (set(), {0}, {5, 9, MAX_BUCKETS - 1}, set(range(0, MAX_BUCKETS, 3))):
        assert decode_buckets(encode_buckets(wanted, MAX_BUCKETS), MAX_BUCKETS) == wanted
    assert canonical_key(["\u00e9", 1, None]) == '["\\u00e9",1,null]'


def test_snapshot_endpoint_refuses_bad_digest_requests(live_server) -> None:  # type: ignore[no-untyped-def]
    Target.objects.create(name="t", secrets="pw")

    def get(query: str) -> requests.Response:
        path = "/sync/snapshot/" + ("?" + query if query else "")
        header = sign_request("t", ["pw"], "GET", path)
        return requests.get(live_server.url + path, headers={"Authorization": header}, timeout=10)

    start = get("").json()
    assert start["digests"] == 1
    ok = get("model=testapp.country&digest=5&limit=10")
    assert ok.status_code == 200 and ok.json()["digests"] == [] and ok.json()["buckets"] == 5
    assert get("model=testapp.country&digest=20000").status_code == 400
    assert get("model=testapp.country&buckets=8&only=AQID").status_code == 400
    assert get("model=testapp.country&buckets=8").status_code == 400
    assert get("model=testapp.country&buckets=8&only=AQ").status_code == 200
    assert get("model=testapp.nothing&digest=5").status_code == 404
