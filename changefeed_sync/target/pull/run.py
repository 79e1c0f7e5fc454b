"""A full pull, phase by phase, in one transaction on the target.

Start (the source's position, models and counts), then each model read page by
page (after a digest comparison where the target already has rows), a second
pass over the models whose rows pointed at rows read later, the deletes of the
rows the source does not have, the checks of the rows moved aside, and last the
checkpoint and the staged files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.db import transaction
from django.utils import timezone

from ... import conf, outbox, registry
from ...context import applying
from ...digests import DIGEST_VERSION
from ...exceptions import ApplyError, ProtocolError
from ...models import DataSource
from ...registry import ModelOptions
from ...rows import collection_paused
from ..apply import is_relay
from ..client import SourceClient, source_id_of
from ..file_transfer import Stage
from .deletes import delete_missing
from .digests import SourceDigests, compare_digests, digest_buckets, scope_deletes
from .page import pull_page
from .pages import pages
from .progress import Progress, ProgressCallback
from .writer import ModelWriter


class _DryRun(Exception):
    pass


@dataclass(frozen=True)
class _Start:
    """The source's answer to the start of a snapshot."""

    position: int
    digests: bool  # whether the source answers digest requests
    labels: list[str]
    totals: dict[str, int]  # rows per model, about
    source_id: str | None


def _start(client: SourceClient, source: DataSource) -> _Start:
    start = client.get_json("snapshot/", {}, timeout=60)
    try:
        return _Start(
            position=int(start["position"]),
            # Sources that answer digest requests say so (older ones do not: full rows).
            digests=start.get("digests") == DIGEST_VERSION,
            labels=[str(label) for label in start["models"]],
            totals={str(k): int(v) for k, v in (start.get("counts") or {}).items()},
            # The source's identity: the checkpoint set below belongs to it (an older
            # source sends none, and the recorded one is cleared).
            source_id=source_id_of(start, f"source {source.name}: malformed snapshot start"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"source {source.name}: malformed snapshot start ({exc})") from exc


def _registered(labels: list[str]) -> list[ModelOptions]:
    all_options = []
    for label in labels:
        options = registry.options_for_label(label)
        if options is None:
            raise ApplyError(
                "model is not registered with changefeed_sync on this site", model=label
            )
        all_options.append(options)
    return all_options


def _new_counts() -> dict[str, int]:
    return {"created": 0, "updated": 0, "deleted": 0, "unchanged": 0}


class _Run:
    """The phases of one pull, sharing its source, its models and its counts."""

    def __init__(
        self, client: SourceClient, using: str, start: _Start, report: ProgressCallback
    ) -> None:
        self.client = client
        self.using = using
        self.start = start
        self.report = report
        self.labels = start.labels
        self.counts: dict[str, dict[str, int]] = {label: _new_counts() for label in self.labels}
        self.index = {label: i + 1 for i, label in enumerate(self.labels)}
        self.writers: dict[str, ModelWriter] = {}
        # Replaced by the digest requests, if any, once the models' tables are known.
        self.source_digests = SourceDigests(client, {})

    def _progress(self, label: str, done: int, phase: str = "read") -> None:
        total = max(self.start.totals.get(label, 0), done)
        self.report(Progress(label, done, total, self.index[label], len(self.labels), phase))

    def prepare(self, all_options: list[ModelOptions], relay: bool) -> None:
        """Each model's writer; the source's digests asked for, for the models with
        rows here (compared, then only what differs is pulled)."""
        for i, options in enumerate(all_options):
            self.writers[options.label] = ModelWriter(options, self.using, i, relay)
        if self.start.digests:
            plan = {}
            for label in self.labels:
                buckets = digest_buckets(self.writers[label], self.start.totals.get(label, 0))
                if buckets is not None:
                    plan[label] = buckets
            self.source_digests = SourceDigests(self.client, plan)

    def read(self, stage: Stage | None) -> None:
        """Every model in order: the rows that differ, or all of them."""
        for label in self.labels:
            model = self.writers[label]
            done = 0
            if label in self.source_digests.futures:
                unchanged = compare_digests(
                    model, self.source_digests.buckets[label],
                    self.source_digests.futures[label], self.counts[label],
                )  # fmt: skip
                if unchanged is not None:
                    done = unchanged
                    self._progress(label, done)
                    if model.only is None:
                        continue  # nothing differs
            extra: dict[str, dict[str, Any]] | None = None
            meanwhile: Callable[[], None] | None = None
            if model.only is not None:
                extra = {label: model.only}
                meanwhile = partial(scope_deletes, model)  # while the source reads
            for _, body in pages(self.client, [label], conf.pull_page_size(), extra, meanwhile):
                with collection_paused():
                    pull_page(model, body["rows"], self.counts[label], stage)
                done += len(body["rows"])
                self._progress(label, done)

    def relink(self) -> None:
        """Second pass over the models whose rows pointed at rows read later
        (self-references, cycles): every row is there now."""
        relink = [label for label in self.labels if self.writers[label].deferred]
        for label in relink:
            self.writers[label].relinking = True
        done = dict.fromkeys(relink, 0)
        extra = {label: only for label in relink if (only := self.writers[label].only) is not None}
        for label, body in pages(self.client, relink, conf.pull_page_size(), extra):
            with collection_paused():
                pull_page(self.writers[label], body["rows"], _new_counts(), None)
            done[label] += len(body["rows"])
            self._progress(label, done[label], "relink")

    def delete_missing(self, allow_mass_delete: bool) -> None:
        """Children first: the rows of each model the source does not have."""
        for label in reversed(self.labels):
            delete_missing(
                self.writers[label],
                self.using,
                self.counts[label],
                allow_mass_delete,
                partial(self._deleted, label),
            )

    def _deleted(self, label: str, deleted: int) -> None:
        self.report(
            Progress(label, deleted, deleted, self.index[label], len(self.labels), "delete")
        )

    def check_moved(self, keep_missing: bool) -> None:
        """Rows moved out of the way of another row's unique value: each must have
        been written again or deleted by now, or the target is not the source."""
        for label in self.labels:
            self.writers[label].moves.check_moved(keep_missing)

    def drop_seen(self) -> None:
        for writer in self.writers.values():
            writer.seen.drop()


def run_pull(
    source: DataSource,
    *,
    using: str | None = None,
    dry_run: bool = False,
    keep_missing: bool = False,
    allow_mass_delete: bool = False,
    progress: ProgressCallback | None = None,
    client: SourceClient | None = None,
) -> tuple[int, dict[str, dict[str, int]]]:
    """Copy the source into this site; return (snapshot position, per-model counts)."""
    using = using or source._state.db or "default"
    client = client or SourceClient(source)
    start = _start(client, source)
    all_options = _registered(start.labels)
    run = _Run(client, using, start, progress or (lambda p: None))
    stage = Stage(client, dry_run=dry_run) if any(o.file_fields for o in all_options) else None
    try:
        with transaction.atomic(using=using), applying():
            # A relay passes on what the pull writes (chained replication), in this
            # transaction (SQLite: its write lock taken up front). A dry run passes
            # nothing on.
            relay = not dry_run and is_relay(using)
            if relay:
                outbox.lock(using)
            run.prepare(all_options, relay)
            run.read(stage)
            run.relink()
            if not keep_missing:
                run.delete_missing(allow_mass_delete)
            run.check_moved(keep_missing)
            run.drop_seen()
            if dry_run:
                raise _DryRun
            _checkpoint(source, using, start)
            if stage is not None:
                # Last, so that nothing before it can fail after files were written.
                stage.publish()
    except _DryRun:
        pass
    except BaseException:
        if stage is not None:
            stage.undo()
        raise
    finally:
        run.source_digests.close()
        run.drop_seen()
        if stage is not None:
            stage.cleanup()
    n = len(start.labels)
    run.report(Progress("", 0, 0, n, n, "done", _files_note(stage, run.counts)))
    return start.position, run.counts


def _checkpoint(source: DataSource, using: str, start: _Start) -> None:
    """The target now holds the source as of the snapshot's position."""
    DataSource.objects.using(using).filter(pk=source.pk).update(
        checkpoint=start.position,
        source_id=start.source_id or "",
        last_sync_at=timezone.now(),
        last_error="",
    )
    source.checkpoint = start.position
    source.source_id = start.source_id or ""


def _files_note(stage: Stage | None, counts: dict[str, dict[str, int]]) -> str:
    if stage is None or not stage.missing_examples:
        return ""
    missing = sum(c.get("files_missing", 0) for c in counts.values())
    return f"{missing} files missing on the source, e.g. " + ", ".join(stage.missing_examples[:3])
