"""Shared test helpers: move a source alias's feed into a target alias, compare states."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from changefeed_sync import registry
from changefeed_sync.models import DataSource, Event
from changefeed_sync.serialization import payloads_from_db
from changefeed_sync.source import feed, sequencer
from changefeed_sync.target.apply import ApplyStats, apply_page


def data_source(alias: str, name: str = "src", url: str = "http://127.0.0.1:1/sync/") -> DataSource:
    return DataSource.objects.using(alias).create(
        name=name, url=url, client_name="tgt", secrets="test-secret"
    )


def pump(source_alias: str, target_alias: str, ds: DataSource, limit: int = 1000) -> ApplyStats:
    """Read the source alias's outbox from the checkpoint and apply it, page by page (no HTTP)."""
    total = ApplyStats()
    while True:
        page = feed.read(ds.checkpoint, limit, using=source_alias)
        if not page.events:
            return total
        stats = apply_page(
            ds, page.events, since=page.since, last_seq=page.last_seq, using=target_alias
        )
        assert stats is not None
        total.add(stats)
        if not page.more:
            return total


def state(alias: str) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """Every registered row on ``alias`` as {label: {natural key: synced data}}."""
    out: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for options in registry.all_options():
        pks = list(options.model._base_manager.using(alias).values_list("pk", flat=True))
        payloads = payloads_from_db(options, pks, alias)
        out[options.label] = {tuple(p["key"]): p["data"] for p in payloads.values()}
    return out


def events(alias: str) -> list[Event]:
    """The outbox's events in feed order, every committed one given its position first."""
    sequencer.sequence(alias)
    return list(Event.objects.using(alias).order_by("position"))


@contextmanager
def signer_clock(offset: float) -> Iterator[None]:
    """Sign requests as a site whose clock is ``offset`` seconds off this one's.

    One process has one clock, so another site's is stood in for by shifting the
    timestamp itsdangerous puts into tokens (a mock, for a fault this machine cannot
    produce otherwise); verification still reads the real clock."""
    from itsdangerous.timed import TimestampSigner

    with mock.patch.object(
        TimestampSigner, "get_timestamp", lambda self: int(time.time() + offset)
    ):
        yield
