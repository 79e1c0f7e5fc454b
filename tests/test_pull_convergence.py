"""A full (re-)pull makes the target equal to the source whatever state either is in
(issue 10).

The target may hold rows with the unique values that the source's rows now have under
other natural keys: a natural key changed outside the ORM, a unique field that is not
the natural key swapped between two rows, a freed unique value taken by a new row.
Rows may point at each other (a nation's capital region is one of its regions, a
region's parent). One pull, all or nothing, must end with exactly the source's rows,
with and without digests, on every database as target; and where it cannot (with
``keep_missing``, a kept row holding a value another source row needs) it stops
naming model, natural key and field, with nothing written.

Real servers and real HTTP as in tests/test_pull.py: PostgreSQL and MariaDB targets
pull from this process's live server (SQLite); the SQLite target pulls from a source
process serving the PostgreSQL test database.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from django.db import connections, transaction
from django.test import override_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import changefeed_sync
from changefeed_sync import applying
from changefeed_sync.exceptions import ApplyError
from changefeed_sync.models import DataSource, Target
from changefeed_sync.target.pull import digests, run_pull
from tests.dbs import require_alias
from tests.helpers import state
from tests.test_pull import SourceProcess
from tests.testapp.models import Document, Nation, Region

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(300),
]


@dataclass
class Sides:
    src: str  # alias of the source's database in this process
    tgt: str  # alias of the target's database
    ds: DataSource  # the source, as the target knows it


@pytest.fixture(scope="module")
def postgres_source(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SourceProcess]:
    """One source process for the module (starting one costs seconds)."""
    require_alias("postgres")
    root = tmp_path_factory.mktemp("convergence-source")
    (root / "media").mkdir()
    process = SourceProcess("postgres", root / "media", root / "source.log")
    yield process
    process.stop()


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def sides(request: pytest.FixtureRequest) -> Iterator[Sides]:
    """A source and a target over HTTP, for each database as target."""
    if request.param == "sqlite":
        process = request.getfixturevalue("postgres_source")
        changefeed_sync.register(Document, natural_key=["slug"], file_fields=["attachment"])
        try:
            Target.objects.using("postgres").create(name="t", secrets="pw")
            ds = DataSource.objects.create(
                name="hq", url=process.url, client_name="t", secrets="pw"
            )
            yield Sides("postgres", "default", ds)
        finally:
            changefeed_sync.unregister(Document)
        return
    require_alias(request.param)
    live_server = request.getfixturevalue("live_server")
    Target.objects.create(name="t", secrets="pw")
    ds = DataSource.objects.using(request.param).create(
        name="hq", url=live_server.url + "/sync/", client_name="t", secrets="pw"
    )
    yield Sides("default", request.param, ds)


def buckets(mode: str) -> Any:
    """``rows``: a re-pull fetches every row (one bucket, which differs); ``digests``:
    one row per bucket, so that only the buckets that differ travel."""
    per_bucket = 10**9 if mode == "rows" else 1
    return mock.patch.object(digests, "ROWS_PER_BUCKET", per_bucket)


@pytest.fixture(params=["rows", "digests"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    with buckets(request.param):
        yield str(request.param)


def links(alias: str) -> set[tuple[str, str]]:
    return set(
        Nation.neighbours.through.objects.using(alias).values_list(
            "from_nation__code", "to_nation__code"
        )
    )


def assert_equal(s: Sides) -> None:
    assert state(s.tgt) == state(s.src)
    assert links(s.tgt) == links(s.src)


def filler(alias: str, mode: str) -> None:
    """Nations that stay the same, so that a digest comparison finds few buckets differ
    (none when every row is pulled anyway)."""
    n = 12 if mode == "digests" else 0
    with applying():
        Nation.objects.using(alias).bulk_create(
            [Nation(code=f"F{i:02}", alpha_3=f"F{i:02}", numeric=500 + i) for i in range(n)]
        )


def pull(s: Sides, **options: Any) -> dict[str, dict[str, int]]:
    _, counts = run_pull(s.ds, using=s.tgt, **options)
    return counts


# --------------------------------------------------------------------------- the defects


def test_repull_after_a_natural_key_changed_outside_the_orm(sides: Sides, mode: str) -> None:
    """A raw UPDATE of the natural key on the source (no event): the new key arrives
    while the old row, still holding the other unique values, is there."""
    s = sides
    filler(s.src, mode)
    dk = Nation.objects.using(s.src).create(code="DK", alpha_3="DNK", numeric=208, name="Denmark")
    capital = Region.objects.using(s.src).create(nation=dk, code="84", name="Hovedstaden")
    Nation.objects.using(s.src).filter(pk=dk.pk).update(capital_region=capital)
    pull(s)
    assert_equal(s)
    table = connections[s.src].ops.quote_name(Nation._meta.db_table)
    with connections[s.src].cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET code = %s WHERE code = %s", ["DX", "DK"])
    counts = pull(s)
    assert_equal(s)
    assert counts["testapp.nation"]["created"] == 1
    assert counts["testapp.nation"]["deleted"] == 1
    assert Nation.objects.using(s.tgt).get(code="DX").capital_region.code == "84"  # type: ignore[union-attr]


@pytest.mark.parametrize(("mode", "page"), [("rows", 1000), ("digests", 1)], indirect=["mode"])
def test_repull_after_a_unique_field_swapped_between_rows(
    sides: Sides, mode: str, page: int, settings: Any
) -> None:
    """DK.alpha_3 <-> FI.alpha_3 through a temporary value in one transaction; the
    target was pulled before. With one row per page the row that holds the value
    comes in a later page; with one page for all, in the same statement."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = page
    s = sides
    filler(s.src, mode)
    dk = Nation.objects.using(s.src).create(code="DK", alpha_3="DNK", numeric=208)
    fi = Nation.objects.using(s.src).create(code="FI", alpha_3="FIN", numeric=246)
    pull(s)
    for _ in range(2):  # and back again
        with transaction.atomic(using=s.src):
            dk.alpha_3, fi.alpha_3 = "TMP", dk.alpha_3
            dk.save()
            fi.save()
            dk.alpha_3 = "DNK" if fi.alpha_3 == "FIN" else "FIN"
            dk.save()
        dk.numeric, fi.numeric = fi.numeric, dk.numeric  # and the nullable one, unsaved
        Nation.objects.using(s.src).filter(pk=dk.pk).update(numeric=None)
        Nation.objects.using(s.src).filter(pk=fi.pk).update(numeric=fi.numeric)
        Nation.objects.using(s.src).filter(pk=dk.pk).update(numeric=dk.numeric)
        counts = pull(s)
        assert_equal(s)
        assert counts["testapp.nation"]["updated"] == 2
        assert counts["testapp.nation"]["created"] == counts["testapp.nation"]["deleted"] == 0


@pytest.mark.parametrize(("mode", "page"), [("rows", 1), ("digests", 1000)], indirect=["mode"])
def test_repull_after_a_freed_unique_value_was_taken(
    sides: Sides, mode: str, page: int, settings: Any
) -> None:
    """SE's numeric changed and a new row ZZY took the old one; then ZZY deleted and
    its numeric taken by NO, an older row (read before ZZY, which still holds it)."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = page
    s = sides
    filler(s.src, mode)
    se = Nation.objects.using(s.src).create(code="SE", alpha_3="SWE", numeric=752)
    no = Nation.objects.using(s.src).create(code="NO", alpha_3="NOR", numeric=578)
    se.neighbours.add(no)
    pull(s)
    se.numeric = 999
    se.save()
    zz = Nation.objects.using(s.src).create(code="ZZY", alpha_3="ZZY", numeric=752)
    zz.neighbours.add(se)
    counts = pull(s)
    assert_equal(s)
    assert Nation.objects.using(s.tgt).get(code="ZZY").numeric == 752
    assert counts["testapp.nation"]["created"] == 1
    assert counts["testapp.nation"]["updated"] == 1
    zz.delete()
    Nation.objects.using(s.src).filter(code="NO").update(numeric=752, alpha_3="ZZY")
    counts = pull(s)
    assert_equal(s)
    assert counts["testapp.nation"]["updated"] == 1
    assert counts["testapp.nation"]["deleted"] == 1


@pytest.mark.parametrize("mode", ["digests"], indirect=True)
def test_rows_pointing_at_each_other_in_one_pull(sides: Sides, mode: str, settings: Any) -> None:
    """New rows that point at each other: a nation's capital region (created after it),
    a cycle of region parents, on a target that already has other rows."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 2
    s = sides
    filler(s.src, mode)
    pull(s)
    xl = Nation.objects.using(s.src).create(code="XL", alpha_3="XLX", numeric=901)
    r1 = Region.objects.using(s.src).create(nation=xl, code="XL-01", name="Capital")
    r2 = Region.objects.using(s.src).create(nation=xl, code="XL-02", parent=r1)
    r3 = Region.objects.using(s.src).create(nation=xl, code="XL-03", parent=r2)
    Region.objects.using(s.src).filter(pk=r1.pk).update(parent=r3)  # r1 -> r3 -> r2 -> r1
    Region.objects.using(s.src).filter(pk=r2.pk).update(parent=r2)  # and one onto itself
    Nation.objects.using(s.src).filter(pk=xl.pk).update(capital_region=r1)
    counts = pull(s)
    assert_equal(s)
    assert counts["testapp.region"]["created"] == 3
    # Moved: the capital to another nation's region, the cycle the other way round.
    yy = Nation.objects.using(s.src).create(code="YY", alpha_3="YYY")
    r4 = Region.objects.using(s.src).create(nation=yy, code="YY-01", parent=r1)
    Nation.objects.using(s.src).filter(pk=xl.pk).update(capital_region=r4)
    Nation.objects.using(s.src).filter(pk=yy.pk).update(capital_region=r4)
    Region.objects.using(s.src).filter(pk=r1.pk).update(parent=r2)
    Region.objects.using(s.src).filter(pk=r2.pk).update(parent=r3)
    Region.objects.using(s.src).filter(pk=r3.pk).update(parent=r4)
    pull(s)
    assert_equal(s)
    counts = pull(s)
    assert counts["testapp.nation"]["unchanged"] == 14
    assert counts["testapp.region"]["unchanged"] == 4


@pytest.mark.parametrize("mode", ["digests"], indirect=True)
def test_keep_missing_stops_on_a_kept_row_holding_a_value_the_source_needs(
    sides: Sides, mode: str
) -> None:
    """A row only the target has holds BB's alpha-3: kept, the target cannot equal the
    source; the pull says which row and field, and writes nothing. Without
    keep_missing it is deleted and the pull converges; a dry run counts exactly that."""
    s = sides
    filler(s.src, mode)
    Nation.objects.using(s.src).create(code="AA", alpha_3="AAA")
    pull(s)
    Nation.objects.using(s.src).create(code="BB", alpha_3="BBB", numeric=7)
    Nation.objects.using(s.src).filter(code="AA").update(name="changed")
    with applying():
        Nation.objects.using(s.tgt).create(code="QQ", alpha_3="BBB", numeric=8)
    before = state(s.tgt)
    with pytest.raises(ApplyError) as info:
        pull(s, keep_missing=True)
    error = info.value
    assert (error.model, list(error.key), error.field) == ("testapp.nation", ["QQ"], "alpha_3")
    assert "keep" in str(error)
    assert state(s.tgt) == before
    preview = pull(s, dry_run=True)
    assert state(s.tgt) == before
    assert preview["testapp.nation"] == {"created": 1, "updated": 1, "deleted": 1, "unchanged": 12}
    assert pull(s) == preview
    assert_equal(s)
    # Kept rows that hold nothing the source needs stay, as before.
    with applying():
        Nation.objects.using(s.tgt).create(code="QQ", alpha_3="QQQ", numeric=9)
    pull(s, keep_missing=True)
    assert Nation.objects.using(s.tgt).filter(code="QQ").exists()


# --------------------------------------------------------------------------- the property

CODES = ["AA", "BB", "CC", "DD", "EE"]
ALPHAS = ["A1", "A2", "A3", "A4", "A5", "A6"]
REGIONS = ["r1", "r2"]


@dataclass
class Atlas:
    """Nations (in creation order, so in primary key order) and their regions."""

    nations: list[tuple[str, str, int | None, str]]  # code, alpha_3, numeric, name
    regions: list[tuple[str, str]]  # nation code, code
    parents: dict[tuple[str, str], tuple[str, str]]
    capitals: dict[str, tuple[str, str]]
    neighbours: set[tuple[str, str]]


@st.composite
def atlases(draw: st.DrawFn) -> Atlas:
    codes = draw(st.lists(st.sampled_from(CODES), unique=True, max_size=len(CODES)))
    # Unique values dealt out as permutations: the same value lands on different rows
    # on the two sides (swaps, values freed and taken, a key renamed).
    alphas = draw(st.permutations(ALPHAS))
    numerics = draw(st.permutations(range(1, len(CODES) + 1)))
    nations = [
        (code, alphas[i], draw(st.sampled_from([numerics[i], None])), draw(st.sampled_from("xy")))
        for i, code in enumerate(codes)
    ]
    regions = [
        (code, r) for code in codes for r in draw(st.lists(st.sampled_from(REGIONS), unique=True))
    ]
    parents, capitals = {}, {}
    if regions:
        pick = st.sampled_from(regions)
        # Self-references, cycles of parents, capitals in other nations.
        parents = {r: draw(pick) for r in regions if draw(st.booleans())}
        capitals = {code: draw(pick) for code in codes if draw(st.booleans())}
    neighbours = set()
    if codes:
        neighbours = set(draw(st.lists(st.tuples(st.sampled_from(codes), st.sampled_from(codes)))))
    return Atlas(nations, regions, parents, capitals, neighbours)


def clear(alias: str) -> None:
    with transaction.atomic(using=alias), applying():
        Nation.objects.using(alias).update(capital_region=None)
        Region.objects.using(alias).update(parent=None)
        Region.objects.using(alias).all().delete()
        Nation.objects.using(alias).all().delete()


def build(alias: str, atlas: Atlas) -> None:
    with transaction.atomic(using=alias), applying():
        nations = {
            code: Nation.objects.using(alias).create(
                code=code, alpha_3=alpha, numeric=numeric, name=name
            )
            for code, alpha, numeric, name in atlas.nations
        }
        regions = {
            (code, r): Region.objects.using(alias).create(nation=nations[code], code=r)
            for code, r in atlas.regions
        }
        for region, parent in atlas.parents.items():
            Region.objects.using(alias).filter(pk=regions[region].pk).update(parent=regions[parent])
        for code, capital in atlas.capitals.items():
            Nation.objects.using(alias).filter(pk=nations[code].pk).update(
                capital_region=regions[capital]
            )
        Nation.neighbours.through.objects.using(alias).bulk_create(
            [
                Nation.neighbours.through(from_nation=nations[a], to_nation=nations[b])
                for a, b in sorted(atlas.neighbours)
            ]
        )


@hsettings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    source=atlases(),
    target=atlases(),
    page=st.sampled_from([1, 2, 1000]),
    compare=st.sampled_from(["rows", "digests"]),
)
def test_one_pull_makes_the_target_equal_the_source(
    sides: Sides, source: Atlas, target: Atlas, page: int, compare: str
) -> None:
    s = sides
    clear(s.src)
    clear(s.tgt)
    build(s.src, source)
    build(s.tgt, target)
    with override_settings(CHANGEFEED_SYNC_PULL_PAGE_SIZE=page), buckets(compare):
        pull(s, allow_mass_delete=True)
    assert_equal(s)
