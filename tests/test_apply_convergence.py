"""Incremental sync converges whatever order the source's changes came in (issue 10).

Each test makes the source go through a sequence of valid states, then syncs the
target with page sizes from one event to the whole feed, and asserts the target
equals the source row by row. The sequences are those users met on real reference
data: rows that point at each other created in one page, a unique field that is not
the natural key swapped between rows, a unique value freed by one row and taken by a
new one. Every database is a target (tests.dbs.BACKEND_PAIRS).
"""

from __future__ import annotations

import pytest
from django.db import connections, transaction

from changefeed_sync.exceptions import ApplyError
from changefeed_sync.models import DataSource, Event
from changefeed_sync.source import feed
from changefeed_sync.target.apply import apply_page
from tests.helpers import data_source, events, pump, state
from tests.testapp.models import Nation, Region

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

PAGE_SIZES = [1, 2, 1000]


def _links(alias: str) -> set[tuple[str, str]]:
    return {
        (a, b)
        for a, b in Nation.neighbours.through.objects.using(alias).values_list(
            "from_nation__code", "to_nation__code"
        )
    }


def _sync_every_way(src: str, tgt: str) -> None:
    """Sync the whole feed into fresh targets, once per page size, each from zero."""
    for size in PAGE_SIZES:
        _clear(tgt)
        ds = data_source(tgt, name=f"src-{size}")
        pump(src, tgt, ds, limit=size)
        assert state(tgt) == state(src), f"page size {size}"
        assert _links(tgt) == _links(src), f"page size {size}"
        ds.refresh_from_db(using=tgt)
        assert ds.checkpoint == events(src)[-1].position


def _clear(alias: str) -> None:
    from changefeed_sync import applying

    with transaction.atomic(using=alias), applying():
        Nation.objects.using(alias).update(capital_region=None)
        Region.objects.using(alias).update(parent=None)
        Region.objects.using(alias).all().delete()
        Nation.objects.using(alias).all().delete()
    DataSource.objects.using(alias).all().delete()


def test_rows_pointing_at_each_other_created_in_one_page(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    xl = Nation.objects.using(src).create(code="XL", alpha_3="XLX", numeric=901)
    region = Region.objects.using(src).create(nation=xl, code="XL-01", name="Capital")
    xl.capital_region = region
    xl.save()
    sub = Region.objects.using(src).create(nation=xl, code="XL-02", parent=region)
    region.parent = sub  # a self-reference cycle too
    region.save()
    _sync_every_way(src, tgt)
    assert Nation.objects.using(tgt).get(code="XL").capital_region.code == "XL-01"


def test_unique_field_swapped_in_one_transaction(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    dk = Nation.objects.using(src).create(code="DK", alpha_3="DNK", numeric=208)
    fi = Nation.objects.using(src).create(code="FI", alpha_3="FIN", numeric=246)
    ds = data_source(tgt, name="before")
    pump(src, tgt, ds)  # the target has DK=DNK, FI=FIN
    with transaction.atomic(using=src):
        dk.alpha_3 = "TMP"
        dk.save()
        fi.alpha_3 = "DNK"
        fi.save()
        dk.alpha_3 = "FIN"
        dk.save()
    for size in PAGE_SIZES:
        with transaction.atomic(using=tgt):
            # Rewind the target to its state before the swap, for each page size.
            Nation.objects.using(tgt).filter(code="DK").update(alpha_3="x")
            Nation.objects.using(tgt).filter(code="FI").update(alpha_3="FIN")
            Nation.objects.using(tgt).filter(code="DK").update(alpha_3="DNK")
        DataSource.objects.using(tgt).filter(pk=ds.pk).update(checkpoint=events(src)[1].position)
        ds.refresh_from_db(using=tgt)
        pump(src, tgt, ds, limit=size)
        assert state(tgt) == state(src), f"page size {size}"
    _sync_every_way(src, tgt)


def test_unique_value_freed_and_taken_by_a_new_row(backend_pair: tuple[str, str]) -> None:
    src, tgt = backend_pair
    se = Nation.objects.using(src).create(code="SE", alpha_3="SWE", numeric=752)
    no = Nation.objects.using(src).create(code="NO", alpha_3="NOR", numeric=578)
    se.neighbours.add(no)  # a many-to-many on the model
    ds = data_source(tgt, name="before")
    pump(src, tgt, ds)
    se.numeric = 999
    se.save()
    zz = Nation.objects.using(src).create(code="ZZY", alpha_3="ZZY", numeric=752)
    zz.neighbours.add(se)
    se.name = "Sweden"
    se.save()
    pump(src, tgt, ds)  # one page: SE frees 752, ZZY takes it, SE edited again
    assert state(tgt) == state(src)
    assert _links(tgt) == _links(src)
    assert Nation.objects.using(tgt).get(code="ZZY").numeric == 752
    _sync_every_way(src, tgt)


def test_a_change_the_target_cannot_write_stops_naming_it(backend_pair: tuple[str, str]) -> None:
    """A unique value the target holds in a row the source does not have: the page
    stops with an error naming model, key, field and position; nothing of it is kept."""
    src, tgt = backend_pair
    Nation.objects.using(src).create(code="AA", alpha_3="AAA")
    Nation.objects.using(src).create(code="BB", alpha_3="BBB")
    Nation.objects.using(tgt).create(code="QQ", alpha_3="BBB")  # only on the target
    ds = data_source(tgt)
    page = feed.read(0, 100, using=src)
    with pytest.raises(ApplyError) as info:
        apply_page(ds, page.events, since=0, last_seq=page.last_seq, using=tgt)
    error = info.value
    assert error.model == "testapp.nation"
    assert list(error.key) == ["BB"]
    assert error.field == "alpha_3"
    assert error.seq == page.events[1]["seq"]
    assert not Nation.objects.using(tgt).filter(code="AA").exists()
    ds.refresh_from_db(using=tgt)
    assert ds.checkpoint == 0
    assert connections[tgt].in_atomic_block is False


def test_mariadb_upsert_matches_the_natural_key_only(db_alias: str) -> None:
    """An upsert never writes into another row that holds the same value of another
    unique field (MariaDB's ON DUPLICATE KEY UPDATE matches any unique key)."""
    tgt = db_alias
    Nation.objects.using(tgt).create(code="SE", alpha_3="SWE", numeric=752, name="Sweden")
    captured = Event.objects.using(tgt).count()
    event = {
        "seq": 7, "model": "testapp.nation", "op": "upsert", "key": ["ZZY"], "old_key": None,
        "changed": None,
        "data": {"code": "ZZY", "alpha_3": "ZZY", "numeric": 752, "name": "", "capital_region": None,
                 "neighbours": []},
    }  # fmt: skip
    ds = data_source(tgt)
    with pytest.raises(ApplyError) as info:
        apply_page(ds, [event], since=0, last_seq=7, using=tgt)
    assert info.value.field == "numeric" and list(info.value.key) == ["ZZY"]
    assert list(Nation.objects.using(tgt).values_list("code", "numeric", "name")) == [
        ("SE", 752, "Sweden")
    ]
    assert Event.objects.using(tgt).count() == captured
    ds.refresh_from_db(using=tgt)
    assert ds.checkpoint == 0


def test_renaming_a_row_that_points_at_a_row_keyed_through_it(
    backend_pair: tuple[str, str],
) -> None:
    """A nation's capital is one of its own regions, whose natural key goes through the
    nation's code: the rename event names the capital by the region's new key, which
    exists on the target only once the nation itself is renamed (found by
    tests/test_convergence.py)."""
    src, tgt = backend_pair
    n0 = Nation.objects.using(src).create(code="N0", alpha_3="AA0")
    r0 = Region.objects.using(src).create(nation=n0, code="R0")
    n0.capital_region = r0
    n0.save()
    ds = data_source(tgt, name="before")
    pump(src, tgt, ds)
    n0.code = "N1"
    n0.save()
    pump(src, tgt, ds)
    assert state(tgt) == state(src)
    Nation.objects.using(src).filter(code="N1").update(code="N2")  # a bulk rename too
    pump(src, tgt, ds, limit=1)
    assert state(tgt) == state(src)
    _sync_every_way(src, tgt)
