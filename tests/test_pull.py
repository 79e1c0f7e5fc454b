"""Full Data Pull over HTTP (live server as the source, another alias as the target)."""

from __future__ import annotations

import pytest

from changefeed_sync import pull as pull_module
from changefeed_sync.exceptions import ApplyError
from changefeed_sync.follow import sync
from changefeed_sync.models import DataPull, DataSource, Event, Target
from changefeed_sync.pull import PullRefused, execute, run_pull
from tests.dbs import require_alias
from tests.helpers import state
from tests.testapp.models import Category, Copy, Country, Language, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(params=["postgres", "mariadb"])
def tgt(request: pytest.FixtureRequest) -> str:
    require_alias(request.param)
    return str(request.param)


@pytest.fixture
def source(live_server, tgt: str) -> DataSource:  # type: ignore[no-untyped-def]
    Target.objects.create(name="t", secrets="pw")
    return DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="t", secrets="pw"
    )


def _seed(countries: int = 3, keys: int = 5) -> None:
    red = Tag.objects.create(slug="red")
    root = Category.objects.create(slug="root")
    Category.objects.create(slug="kid", parent=root)
    for c in range(countries):
        country = Country.objects.create(code=f"c{c}")
        lang = Language.objects.create(country=country, code="xx")
        for k in range(keys):
            copy = Copy.objects.create(language=lang, key=f"k{k}", value=str(k))
            if k % 2:
                copy.tags.add(red)


def test_pull_copies_then_feed_continues(source: DataSource, tgt: str) -> None:
    _seed()
    position, counts = run_pull(source, using=tgt)
    assert state(tgt) == state("default")
    assert position == Event.objects.order_by("-id").first().id  # type: ignore[union-attr]
    assert counts["testapp.copy"]["created"] == 15
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == position
    # Changes after the snapshot arrive through the feed, nothing skipped.
    Copy.objects.filter(key="k1").update(value="after")
    Country.objects.create(code="zz")
    sync(source, using=tgt)
    assert state(tgt) == state("default")


def test_repull_counts_unchanged_and_deletes_missing(source: DataSource, tgt: str) -> None:
    _seed()
    run_pull(source, using=tgt)
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.copy"] == {"created": 0, "updated": 0, "deleted": 0, "unchanged": 15}
    Copy.objects.filter(key="k4").delete()
    Copy.objects.filter(key="k0").update(value="new")
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.copy"] == {"created": 0, "updated": 3, "deleted": 3, "unchanged": 9}
    assert state(tgt) == state("default")


def test_empty_source_does_not_wipe_the_target(source: DataSource, tgt: str) -> None:
    _seed()
    run_pull(source, using=tgt)
    Country.objects.all().delete()
    with pytest.raises(PullRefused, match="testapp.copy"):
        run_pull(source, using=tgt)
    assert Copy.objects.using(tgt).count() == 15
    _, counts = run_pull(source, using=tgt, keep_missing=True)
    assert Copy.objects.using(tgt).count() == 15
    run_pull(source, using=tgt, allow_mass_delete=True)
    assert Copy.objects.using(tgt).count() == 0


def test_dry_run_writes_nothing(source: DataSource, tgt: str) -> None:
    _seed()
    _, counts = run_pull(source, using=tgt, dry_run=True)
    assert counts["testapp.copy"]["created"] == 15
    assert Copy.objects.using(tgt).count() == 0
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == 0


def test_failed_pull_leaves_target_as_it_was_and_is_recorded(
    source: DataSource, tgt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed()
    run_pull(source, using=tgt)
    before = state(tgt)
    Copy.objects.filter(key="k0").update(value="changed")
    # A row that cannot be applied: the target lacks a field (simulated by
    # renaming the field in the payload on the way in; no real source sends it).
    original = pull_module._pull_model

    def broken(client, label, using, counts, progress):  # type: ignore[no-untyped-def]
        if label == "testapp.copy":
            raise ApplyError("event lacks a field", model=label, field="value")
        return original(client, label, using, counts, progress)

    monkeypatch.setattr(pull_module, "_pull_model", broken)
    record = execute(DataPull.objects.using(tgt).create(source=source), using=tgt)
    assert record.status == DataPull.FAILED
    assert "testapp.copy" in record.error and "value" in record.error
    assert record.finished_at is not None
    assert state(tgt) == before


def test_source_down_mid_pull_changes_nothing(live_server, tgt: str) -> None:  # type: ignore[no-untyped-def]
    Target.objects.create(name="t", secrets="pw")
    _seed()
    src = DataSource.objects.using(tgt).create(
        name="down", url="http://127.0.0.1:9/sync/", client_name="t", secrets="pw"
    )
    record = execute(DataPull.objects.using(tgt).create(source=src), using=tgt)
    assert record.status == DataPull.FAILED
    assert "127.0.0.1:9" in record.error
    assert Copy.objects.using(tgt).count() == 0
