"""Replaying feed events on the target: idempotent, batched, all or nothing.

A page of events is applied in one transaction together with the Data
Source's checkpoint, so a crash anywhere leaves either the whole page and
the new checkpoint, or neither. Every write is an upsert or a delete by
natural key, so applying a page twice changes nothing.

Inside a page, consecutive events of the same kind (upserts, or deletes)
form a run. A run is coalesced (the last event of a key wins) and written
with bulk statements: upserts parents first, deletes children first. An
event that renames a row (it carries ``old_key``) is applied on its own, in
place, so the row keeps its primary key and nothing cascades.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import DataError, IntegrityError, models, transaction
from django.utils import timezone

from .. import conf, outbox
from ..context import applying
from ..exceptions import ApplyError
from ..keys import model_order, resolve_keys
from ..models import DataSource, Event, Target
from ..registry import Key, ModelOptions
from ..serialization import chunked, decode_value, key_of_row
from .changes import IncomingChange, parse_common
from .links import write_m2m
from .upsert import write_rows
from .values import Pending, build_values, fk_maps, key_values


@dataclass
class ApplyStats:
    events: int = 0
    upserted: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    deleted: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: ApplyStats) -> None:
        self.events += other.events
        for label, n in other.upserted.items():
            self.upserted[label] += n
        for label, n in other.deleted.items():
            self.deleted[label] += n


def _by_model(changes: list[IncomingChange]) -> dict[type[models.Model], list[IncomingChange]]:
    by_model: dict[type[models.Model], list[IncomingChange]] = defaultdict(list)
    for change in changes:
        by_model[change.options.model].append(change)
    return by_model


def apply_upserts(changes: list[IncomingChange], using: str, stats: ApplyStats) -> None:
    """Write a coalesced run of upserts, parents first, in rounds for self-references."""
    by_model = _by_model(changes)
    order = model_order(by_model)
    # Rows of this run that other rows of it may point at (self-references, parents
    # written in the same run); a row pointing at one not yet written waits a round.
    pointed_at = {
        fk.related_model for model in by_model for fk in by_model[model][0].options.fk_fields
    }
    pending = {(c.options.label, c.key) for c in changes if c.options.model in pointed_at}
    while True:
        progress = False
        blocked: dict[type[models.Model], list[IncomingChange]] = {}
        for model in order:
            todo = by_model.get(model) or []
            if not todo:
                continue
            options = todo[0].options
            maps = fk_maps(todo, using)
            ready: list[tuple[IncomingChange, dict[str, Any]]] = []
            wait: list[IncomingChange] = []
            for change in todo:
                try:
                    ready.append((change, build_values(change, using, maps, pending)))
                except Pending:
                    wait.append(change)
            if ready:
                pks = write_rows(options, ready, using)
                write_m2m(options, [c for c, _ in ready], using, pks)
                stats.upserted[options.label] += len(ready)
                if model in pointed_at:
                    for change, _ in ready:
                        pending.discard((options.label, change.key))
                progress = True
            if wait:
                blocked[model] = wait
        if not blocked:
            return
        if not progress:
            change = next(iter(blocked.values()))[0]
            raise ApplyError(
                "rows point at each other in a cycle that cannot be written",
                model=change.options.label,
                key=change.key,
                seq=change.seq,
            )
        by_model = defaultdict(list, blocked)


def _apply_deletes(changes: list[IncomingChange], using: str, stats: ApplyStats) -> None:
    by_model = _by_model(changes)
    for model in reversed(model_order(by_model)):
        options = by_model[model][0].options
        pks = list(resolve_keys(options, [c.key for c in by_model[model]], using).values())
        for chunk in chunked(pks, 500):
            model._base_manager.using(using).filter(pk__in=chunk).delete()
        stats.deleted[options.label] += len(pks)


def _apply_rename(change: IncomingChange, using: str, stats: ApplyStats) -> None:
    """Rename a row in place: same primary key, so nothing that points at it cascades."""
    options = change.options
    assert change.old_key is not None
    found = resolve_keys(options, [change.old_key, change.key], using)
    old_pk, new_pk = found.get(change.old_key), found.get(change.key)
    if old_pk is None or new_pk is not None:
        # Nothing to rename (never had it, or already renamed): a plain upsert.
        apply_upserts([change], using, stats)
        return
    manager = options.model._base_manager.using(using)
    maps = fk_maps([change], using)
    try:
        values = build_values(change, using, maps, set())
    except ApplyError:
        # The row may point at a row whose natural key goes through this one (a
        # nation's capital is one of its regions, keyed by the nation's code): the
        # event names it by its new key, which exists once this row has its new
        # key. So the key first, then the rest.
        manager.filter(pk=old_pk).update(**key_values(change, using, maps))
        values = build_values(change, using, fk_maps([change], using), set())
    manager.filter(pk=old_pk).update(**values)
    write_m2m(options, [change], using)
    stats.upserted[options.label] += 1


def _flush(run: list[IncomingChange], using: str, stats: ApplyStats) -> None:
    if not run:
        return
    last: dict[tuple[str, Key], IncomingChange] = {}
    for change in run:
        # The last change of a key wins, in the position of that last change.
        coalesce_key = (change.options.label, change.key)
        if coalesce_key in last:
            del last[coalesce_key]
        last[coalesce_key] = change
    coalesced = list(last.values())
    if run[0].op == Event.UPSERT:
        apply_upserts(coalesced, using, stats)
    else:
        _apply_deletes(coalesced, using, stats)
    run.clear()


def apply_events(
    events: Sequence[dict[str, Any]], *, using: str, relay: bool = False
) -> ApplyStats:
    """Apply feed events on ``using``; the caller owns the transaction.

    First as merged runs (the fast path, a few statements per page). A page
    whose merged form cannot be written although its events can -- rows that
    point at each other created in one page, a unique value handed from one row
    to another, a swap -- is rolled back to a savepoint and applied again in the
    events' own order, each event in the state the source had then: the order
    the source itself went through, so it works wherever the source's did.
    Only such pages pay for it.
    """
    labels: dict[Any, ModelOptions | None] = {}
    changes = [parse_common(raw, labels) for raw in events]
    stats = ApplyStats(events=len(changes))
    with applying():
        try:
            with transaction.atomic(using=using):
                _apply_merged(changes, using, stats)
        except (IntegrityError, DataError, ApplyError):
            stats = ApplyStats(events=len(changes))
            _apply_in_order(changes, using, stats)
    if relay and changes:
        _relay(changes, using)
    return stats


def _relay(changes: list[IncomingChange], using: str) -> None:
    """This site is a source for others too: pass the changes on (chained replication)."""
    outbox.write(
        using,
        [
            outbox.make_event(
                c.options.label,
                c.op,
                c.raw.get("key"),
                old_key=c.raw.get("old_key"),
                data=c.raw.get("data"),
                changed=c.raw.get("changed"),
            )
            for c in changes
        ],
    )


def _apply_merged(changes: list[IncomingChange], using: str, stats: ApplyStats) -> None:
    run: list[IncomingChange] = []
    for change in changes:
        if change.old_key is not None and change.old_key != change.key:
            _flush(run, using, stats)
            _apply_rename(change, using, stats)
            continue
        if run and run[0].op != change.op:
            _flush(run, using, stats)
        run.append(change)
    _flush(run, using, stats)


def _apply_in_order(changes: list[IncomingChange], using: str, stats: ApplyStats) -> None:
    """One event at a time, in feed order; an event the target refuses stops the
    page with an error naming its model, key, field and position."""
    for change in changes:
        try:
            with transaction.atomic(using=using):
                if change.old_key is not None and change.old_key != change.key:
                    _apply_rename(change, using, stats)
                elif change.op == Event.UPSERT:
                    apply_upserts([change], using, stats)
                else:
                    _apply_deletes([change], using, stats)
        except (IntegrityError, DataError) as exc:
            raise refused(change, exc, using) from exc


def refused(change: IncomingChange, exc: Exception, using: str) -> ApplyError:
    """What the database refused in ``change``, said in the domain's words: the
    unique field whose value another row holds (and that row's key), or the field
    whose value the column cannot store."""
    options = change.options
    values = build_values(change, using, fk_maps([change], using), set())
    clash = _unique_clash(change, values, using)
    if clash is not None:
        return clash
    for f in options.plain_fields:
        limit = getattr(f, "max_length", None)
        value = values.get(f.attname)
        if limit and isinstance(value, str) and len(value) > limit:
            return ApplyError(
                f"value is longer than the column's {limit} characters",
                model=options.label,
                key=change.key,
                field=f.name,
                seq=change.seq,
            )
    return ApplyError(
        f"the target's database refused the row ({exc})",
        model=options.label,
        key=change.key,
        seq=change.seq,
    )


def _unique_clash(change: IncomingChange, values: dict[str, Any], using: str) -> ApplyError | None:
    """The error naming another row here that holds one of ``change``'s unique values
    (not its natural key), if one does."""
    options = change.options
    model = options.model
    own = [change.key] + ([change.old_key] if change.old_key is not None else [])
    manager = model._base_manager.using(using)
    for group in options.other_unique_groups:
        fields = [model._meta.get_field(name) for name in group]
        lookup = {f.attname: values.get(f.attname) for f in fields}  # type: ignore[union-attr]
        if any(v is None for v in lookup.values()) or len(lookup) != len(group):
            continue  # NULL never clashes; a column we do not write keeps its value
        others = manager.filter(**lookup)
        for key in own:
            others = others.exclude(
                **{
                    lookup_: decode_value(f, v)
                    for lookup_, f, v in zip(options.lookups, options.key_fields, key, strict=True)
                }
            )
        holder = others.values_list(*options.lookups).first()
        if holder is not None:
            return ApplyError(
                f"another row of the target, natural key {list(key_of_row(options, holder))!r}, "
                f"holds the same unique value {list(lookup.values())!r}",
                model=options.label,
                key=change.key,
                field=", ".join(group),
                seq=change.seq,
            )
    return None


def is_relay(using: str) -> bool:
    """A site that serves its own feed to targets re-publishes what it applies."""
    return bool(Target.objects.using(using).filter(active=True).exists())


def apply_page(
    source: DataSource,
    events: Sequence[dict[str, Any]],
    *,
    since: int,
    last_seq: int,
    using: str | None = None,
    nonce: str | None = None,
    before_checkpoint: Callable[[str], None] | None = None,
) -> ApplyStats | None:
    """Apply one feed page and move the checkpoint from ``since`` to ``last_seq``, atomically.

    Returns None, writing nothing, when the checkpoint is no longer ``since``
    (another process applied this page first). ``before_checkpoint(using)`` runs
    inside the transaction once the rows are written, before the checkpoint
    moves (file contents are written there): if it raises, nothing is kept.
    """
    using = using or source._state.db or "default"
    with transaction.atomic(using=using):
        # SQLite: take the write lock up front (a transaction that reads, then
        # writes, fails at once if another writer got in between).
        outbox.lock(using)
        locked = DataSource.objects.using(using).select_for_update().get(pk=source.pk)
        if locked.checkpoint != since:
            return None
        if nonce is not None:
            # A pushed batch: its request's nonce commits (or not) with its data.
            from ..signing import remember_nonce

            remember_nonce(nonce, using, max_age=conf.webhook_tolerance())
        stats = apply_events(events, using=using, relay=is_relay(using))
        if before_checkpoint is not None:
            before_checkpoint(using)
        now = timezone.now()
        DataSource.objects.using(using).filter(pk=source.pk).update(
            checkpoint=last_seq, last_sync_at=now, last_error="", last_error_at=None
        )
    source.checkpoint = last_seq
    source.last_sync_at = now
    source.last_error = ""
    return stats
