"""Full Data Pull: make the target an exact copy of the source's registered rows.

All or nothing: the whole pull runs in one transaction on the target, so a
failure anywhere (source down, a row that cannot be applied, a killed
process) leaves the target as it was. Rows the source does not have are
deleted only after every page was read, and a pull that would delete more
than half of a model's rows stops unless explicitly allowed (an empty or
wrong source must not wipe the target). A dry run does all the work and
rolls it back, so its counts are exactly what a real pull would do.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from django.db import connections, transaction
from django.utils import timezone

from . import registry
from .apply import ApplyStats, _apply_upserts, _Change, resolve_keys
from .client import SourceClient
from .context import applying
from .exceptions import ApplyError, ChangefeedError, ProtocolError
from .models import DataPull, DataSource, Event
from .serialization import chunked, normalize_key, payloads_from_db

logger = logging.getLogger("changefeed_sync.pull")

PAGE_SIZE = 2000
MAX_DELETE_SHARE = 0.5


class PullRefused(ChangefeedError):
    """The pull would delete too much; nothing was written."""


class _DryRun(Exception):
    pass


def _pull_model(
    client: SourceClient,
    label: str,
    using: str,
    counts: dict[str, dict[str, int]],
    progress: Callable[[str], None],
) -> set[Any]:
    """Upsert every row of one model; return the target pks that the source has."""
    options = registry.options_for_label(label)
    if options is None:
        raise ApplyError("model is not registered with changefeed_sync on this site", model=label)
    c = counts.setdefault(label, {"created": 0, "updated": 0, "deleted": 0, "unchanged": 0})
    seen: set[Any] = set()
    after = ""
    while True:
        body = client.get_json(
            "snapshot/", {"model": label, "after": after, "limit": PAGE_SIZE}, timeout=120
        )
        rows = body.get("rows")
        if not isinstance(rows, list):
            raise ProtocolError(f"snapshot page of {label} has no rows")
        keys = []
        for row in rows:
            try:
                keys.append(normalize_key(options, row["key"]))
            except Exception as exc:
                raise ApplyError(
                    f"bad natural key ({exc})", model=label, key=row.get("key")
                ) from exc
        existing = resolve_keys(options, keys, using)
        current = payloads_from_db(options, list(existing.values()), using)
        changes = []
        for key, row in zip(keys, rows, strict=True):
            pk = existing.get(key)
            if pk is not None:
                seen.add(pk)
                if current.get(pk, {}).get("data") == row["data"]:
                    c["unchanged"] += 1
                    continue
                c["updated"] += 1
            else:
                c["created"] += 1
            changes.append(_Change(0, options, Event.UPSERT, key, None, row["data"], row))
        if changes:
            from .apply import _parse

            # Same validation as feed events (unknown or missing fields).
            for change in changes:
                _parse(
                    {
                        "seq": 0,
                        "model": label,
                        "op": "upsert",
                        "key": list(change.key),
                        "data": change.data,
                    }
                )
            _apply_upserts(changes, using, ApplyStats())
            created = [ch.key for ch in changes if ch.key not in existing]
            seen.update(resolve_keys(options, created, using).values())
        progress(f"{label}: {sum(c.values())} rows")
        after = str(body.get("next", ""))
        if not body.get("more"):
            return seen


def run_pull(
    source: DataSource,
    *,
    using: str | None = None,
    dry_run: bool = False,
    keep_missing: bool = False,
    allow_mass_delete: bool = False,
    progress: Callable[[str], None] | None = None,
    client: SourceClient | None = None,
) -> tuple[int, dict[str, dict[str, int]]]:
    """Copy the source into this site; return (snapshot position, per-model counts)."""
    using = using or source._state.db or "default"
    client = client or SourceClient(source)
    report = progress or (lambda message: None)
    start = client.get_json("snapshot/", {}, timeout=60)
    try:
        position = int(start["position"])
        labels = [str(label) for label in start["models"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"source {source.name}: malformed snapshot start ({exc})") from exc
    counts: dict[str, dict[str, int]] = {}
    try:
        with transaction.atomic(using=using), applying():
            seen = {label: _pull_model(client, label, using, counts, report) for label in labels}
            if not keep_missing:
                for label in reversed(labels):
                    _delete_missing(label, seen[label], using, counts, allow_mass_delete)
            if dry_run:
                raise _DryRun
            DataSource.objects.using(using).filter(pk=source.pk).update(
                checkpoint=position, last_sync_at=timezone.now(), last_error=""
            )
            source.checkpoint = position
    except _DryRun:
        pass
    return position, counts


def _delete_missing(
    label: str, seen: set[Any], using: str, counts: dict[str, dict[str, int]], allow: bool
) -> None:
    options = registry.options_for_label(label)
    assert options is not None
    manager = options.model._base_manager.using(using)
    # Stream the pks instead of one NOT IN (...) of every id: bind-parameter limits.
    total = 0
    missing = []
    for pk in manager.values_list("pk", flat=True).iterator(chunk_size=5000):
        total += 1
        if pk not in seen:
            missing.append(pk)
    if not missing:
        return
    if not allow and total and len(missing) > MAX_DELETE_SHARE * total:
        raise PullRefused(
            f"the pull would delete {len(missing)} of {total} rows of {label} "
            f"(more than {MAX_DELETE_SHARE:.0%}); if the source really is that empty, pull again "
            "with --allow-mass-delete (or the admin option), or use --keep-missing"
        )
    for chunk in chunked(missing, 500):
        manager.filter(pk__in=chunk).delete()
    counts[label]["deleted"] += len(missing)


def execute(
    pull: DataPull, *, using: str | None = None, progress: Callable[[str], None] | None = None
) -> DataPull:
    """Run a DataPull row and record its outcome (outside the pull's transaction)."""
    using = using or pull._state.db or "default"
    rows = DataPull.objects.using(using).filter(pk=pull.pk)
    rows.update(status=DataPull.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now())

    def report(message: str) -> None:
        rows.update(progress=message[:200], heartbeat_at=timezone.now())
        if progress is not None:
            progress(message)

    try:
        position, counts = run_pull(
            pull.source,
            using=using,
            dry_run=pull.dry_run,
            keep_missing=pull.keep_missing,
            allow_mass_delete=pull.allow_mass_delete,
            progress=report,
        )
    except Exception as exc:
        logger.exception("pull %s from %s failed", pull.pk, pull.source)
        rows.update(status=DataPull.FAILED, finished_at=timezone.now(), error=str(exc)[:5000])
    else:
        rows.update(
            status=DataPull.SUCCEEDED,
            finished_at=timezone.now(),
            counts=counts,
            position=position,
            progress="preview: nothing written" if pull.dry_run else "done",
        )
    pull.refresh_from_db(using=using)
    return pull


def start_in_background(pull_pk: int, using: str = "default") -> threading.Thread:
    """Run a pull in a thread of this process (the default when no task backend is set)."""

    def run() -> None:
        try:
            execute(DataPull.objects.using(using).get(pk=pull_pk), using=using)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=f"changefeed-pull-{pull_pk}", daemon=True)
    thread.start()
    return thread
