"""Upgrading to the sequencer (migration 0006) keeps every outbox and checkpoint valid.

Before 0006 an event's id was its feed position; targets hold such positions as
checkpoints (Data Sources) and the source remembers them (Targets' last seen).
After it, ids only record insertion order and positions are given after commit:
existing events keep their id as their position, and new ones continue after the
highest. Run on the three databases.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models import F, Max

from changefeed_sync.models import Event, OutboxState
from changefeed_sync.source import feed
from tests.testapp.models import Country

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

BEFORE = [("changefeed_sync", "0005_source_identity")]
AFTER = [("changefeed_sync", "0006_sequencer")]


def _migrate(alias: str, to: list[tuple[str, str]]) -> Any:
    executor = MigrationExecutor(connections[alias])
    executor.migrate(to)
    return executor.loader.project_state(to).apps


def _latest(alias: str) -> None:
    executor = MigrationExecutor(connections[alias])
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_existing_events_keep_their_positions_and_new_ones_follow(db_alias: str) -> None:
    alias = db_alias
    old = _migrate(alias, BEFORE)
    try:
        events = old.get_model("changefeed_sync", "Event").objects.using(alias)
        made = [
            events.create(model="testapp.country", op="upsert", key=[f"c{n}"], data={"name": ""})
            for n in range(5)
        ]
        ids = [e.id for e in made]
        # The first two were pruned: pruned_through is the second's id.
        events.filter(id__in=ids[:2]).delete()
        state = old.get_model("changefeed_sync", "OutboxState").objects.using(alias)
        state.update_or_create(id=1, defaults={"pruned_through": ids[1]})
        checkpoint = ids[3]  # a target that has read up to the fourth event

        new = _migrate(alias, AFTER)
        rows = dict(
            new.get_model("changefeed_sync", "Event").objects.using(alias)
            .values_list("id", "position")
        )  # fmt: skip
        assert rows == {i: i for i in ids[2:]}
        [last] = (
            new.get_model("changefeed_sync", "OutboxState").objects.using(alias)
            .values_list("last_position", flat=True)
        )  # fmt: skip
        assert last == ids[-1]
    finally:
        _latest(alias)

    # The target's checkpoint still means what it meant: the next page is the fifth event.
    page = feed.read(checkpoint, 10, using=alias)
    assert [(e["seq"], e["key"]) for e in page.events] == [(ids[4], ["c4"])]
    # New events go on after the highest position, without a gap, whatever their ids
    # (ids skip where a transaction rolled back, on PostgreSQL and MariaDB).
    _skip_ids(alias, 10)
    Country.objects.using(alias).create(code="nw")
    page = feed.read(ids[4], 10, using=alias)
    assert [(e["seq"], e["key"]) for e in page.events] == [(ids[4] + 1, ["nw"])]
    assert feed.head(alias) == ids[4] + 1
    stored = Event.objects.using(alias).get(position=ids[4] + 1)
    assert stored.id > stored.position


def _skip_ids(alias: str, count: int) -> None:
    """Use up ``count`` event ids, as transactions that roll back after writing events
    do on PostgreSQL (SQLite gives a rolled-back id again, MySQL/MariaDB write a
    transaction's events at commit): an event is written with a later id and removed."""
    if connections[alias].vendor == "postgresql":  # a sequence never gives an id back
        for _ in range(count):
            with pytest.raises(RuntimeError), transaction.atomic(using=alias):
                Country.objects.using(alias).create(code="xx")
                raise RuntimeError("roll back")
        return
    # AUTOINCREMENT and AUTO_INCREMENT go on after the highest id ever written.
    newest = Event.objects.using(alias).order_by("-id").values_list("id", flat=True).first()
    Event.objects.using(alias).create(id=(newest or 0) + count, model="x", op="upsert", key=[])
    Event.objects.using(alias).filter(id=(newest or 0) + count).delete()


def test_going_back_is_refused_once_positions_differ_from_ids(db_alias: str) -> None:
    alias = db_alias
    Country.objects.using(alias).create(code="aa")
    feed.head(alias)
    # As after the upgrade of an existing outbox: every position is its id.
    Event.objects.using(alias).update(position=F("id"))
    OutboxState.objects.using(alias).update(
        last_position=Event.objects.using(alias).aggregate(m=Max("id"))["m"]
    )
    try:
        _migrate(alias, BEFORE)  # allowed
        _latest(alias)
        _skip_ids(alias, 3)
        Country.objects.using(alias).create(code="bb")
        feed.head(alias)
        with pytest.raises(RuntimeError, match="positions that differ from their ids"):
            _migrate(alias, BEFORE)
    finally:
        _latest(alias)
    assert [e["key"] for e in feed.read(0, 10, using=alias).events] == [["aa"], ["bb"]]
    assert_consecutive = [e["seq"] for e in feed.read(0, 10, using=alias).events]
    assert assert_consecutive[1] == assert_consecutive[0] + 1
