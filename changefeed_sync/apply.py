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

import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import DataError, IntegrityError, connections, models, transaction
from django.utils import timezone

from . import conf, outbox, registry, sql
from .context import applying
from .exceptions import ApplyError
from .keys import max_params as _max_params
from .keys import model_order, resolve_keys
from .models import DataSource, Event, Target
from .registry import Key, ModelOptions
from .serialization import chunked, decode_value, key_of_row, normalize_key


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


@dataclass(slots=True)
class _Change:
    seq: int
    options: ModelOptions
    op: str
    key: Key
    old_key: Key | None
    data: dict[str, Any]
    raw: dict[str, Any]


# ------------------------------------------------------------ parsing


def _parse_common(raw: dict[str, Any], labels: dict[Any, ModelOptions | None]) -> _Change:
    """``_parse`` for the event nearly every page is made of: an upsert of a known
    model with exactly its fields and no rename. Anything else, and every
    error, goes through ``_parse``."""
    try:
        options = labels[raw["model"]]
        data = raw["data"]
        if (
            options is not None
            and raw["op"] == "upsert"
            and raw["old_key"] is None
            and type(data) is dict
            and data.keys() == options.field_names
        ):
            return _Change(
                int(raw["seq"]), options, "upsert", normalize_key(options, raw["key"]), None,
                data, raw,
            )  # fmt: skip
    except Exception:  # noqa: S110 - the full parse below names what is wrong
        pass
    return _parse(raw, labels)


def _parse(raw: dict[str, Any], labels: dict[Any, ModelOptions | None] | None = None) -> _Change:
    """One wire event -> a checked change. ``labels`` caches label -> options for a page."""
    if labels is None:
        labels = {}
    seq = raw.get("seq")
    label = raw.get("model")
    try:
        options = labels[label]
    except KeyError:
        options = labels[label] = registry.options_for_label(str(label))
    except TypeError:  # not hashable: not a label
        options = None
    if options is None:
        raise ApplyError(
            "model is not registered with changefeed_sync on this site",
            model=str(label),
            key=raw.get("key"),
            seq=seq,
        )
    op = raw.get("op")
    try:
        key = normalize_key(options, raw.get("key") or [])
        old_key = normalize_key(options, raw["old_key"]) if raw.get("old_key") else None
    except (ValueError, TypeError, Exception) as exc:
        raise ApplyError(
            f"bad natural key ({exc})", model=options.label, key=raw.get("key"), seq=seq
        ) from exc
    if op == Event.DELETE:
        return _Change(int(seq or 0), options, Event.DELETE, key, None, {}, raw)
    if op != Event.UPSERT:
        raise ApplyError(f"unknown operation {op!r}", model=options.label, key=key, seq=seq)
    data = raw.get("data")
    if not isinstance(data, dict):
        raise ApplyError("upsert carries no data", model=options.label, key=key, seq=seq)
    if data.keys() == options.field_names:  # the common case, one comparison
        return _Change(int(seq or 0), options, Event.UPSERT, key, old_key, data, raw)
    unknown = set(data) - options.field_names
    if unknown:
        raise ApplyError(
            "event has a field this site's model does not sync",
            model=options.label,
            key=key,
            field=sorted(unknown)[0],
            seq=seq,
        )
    missing = options.field_names - set(data)
    if missing:
        raise ApplyError(
            "event lacks a field this site's model syncs",
            model=options.label,
            key=key,
            field=sorted(missing)[0],
            seq=seq,
        )
    return _Change(int(seq or 0), options, Event.UPSERT, key, old_key, data, raw)


# ------------------------------------------------------------ applying


class _Pending(Exception):
    """A row points at a row written later in the same run."""


def _build_values(
    change: _Change, using: str, fk_maps: dict[str, dict[Key, Any]], pending: set[tuple[str, Key]]
) -> dict[str, Any]:
    options = change.options
    data = change.data
    values: dict[str, Any] = {}
    for f, needs_decoding in options.plain_decoding:
        raw = data[f.name]
        if not needs_decoding and type(raw) is str:
            values[f.attname] = raw
            continue
        try:
            values[f.attname] = decode_value(f, raw)
        except Exception as exc:
            raise ApplyError(
                f"bad value {raw!r} ({exc})",
                model=options.label,
                key=change.key,
                field=f.name,
                seq=change.seq,
            ) from exc
    for fk in options.fk_fields:
        raw = data[fk.name]
        if raw is None:
            values[fk.attname] = None
            continue
        mapping = fk_maps.get(fk.name)
        if mapping is None:  # the related model is not registered
            try:
                related = fk.related_model._default_manager.db_manager(using).get_by_natural_key(
                    *raw
                )
            except Exception as exc:
                raise ApplyError(
                    "foreign natural key resolves to nothing",
                    model=options.label,
                    key=change.key,
                    field=fk.name,
                    seq=change.seq,
                ) from exc
            values[fk.attname] = getattr(related, fk.target_field.attname)
            continue
        pk = mapping.get(tuple(raw))
        if pk is None:
            rel_options = registry.get_options(fk.related_model)
            assert rel_options is not None
            rel_key = normalize_key(rel_options, raw)
            if (rel_options.label, rel_key) in pending:
                raise _Pending
            raise ApplyError(
                f"foreign natural key {list(rel_key)!r} of {rel_options.label} resolves to nothing",
                model=options.label,
                key=change.key,
                field=fk.name,
                seq=change.seq,
            )
        values[fk.attname] = pk
    return values


def _fk_maps(changes: Sequence[_Change], using: str) -> dict[str, dict[Key, Any]]:
    """Per foreign key: the natural key as it came on the wire (a tuple) -> the
    value to store, for the related rows that exist on ``using``. Each distinct
    key is normalized and looked up once, however many rows point at it."""
    options = changes[0].options
    maps: dict[str, dict[Key, Any]] = {}
    for fk in options.fk_fields:
        rel_options = registry.get_options(fk.related_model)
        if rel_options is None:
            continue
        normalized: dict[Key, Key] = {}
        for change in changes:
            raw = change.data[fk.name]
            if raw is None:
                continue
            try:
                wire = tuple(raw)
                if wire not in normalized:
                    normalized[wire] = normalize_key(rel_options, wire)
            except Exception as exc:
                raise ApplyError(
                    f"bad foreign natural key {raw!r} ({exc})",
                    model=options.label,
                    key=change.key,
                    field=fk.name,
                    seq=change.seq,
                ) from exc
        # Targets of a foreign key need not be the related model's primary key.
        mapped = resolve_keys(rel_options, normalized.values(), using)
        if fk.target_field.attname != rel_options.model._meta.pk.attname:
            to_attr = dict(
                rel_options.model._base_manager.using(using)
                .filter(pk__in=list(mapped.values()))
                .values_list("pk", fk.target_field.attname)
            )
            mapped = {k: to_attr[pk] for k, pk in mapped.items()}
        maps[fk.name] = {wire: mapped[key] for wire, key in normalized.items() if key in mapped}
    return maps


def _write_rows(
    options: ModelOptions, rows: list[tuple[_Change, dict[str, Any]]], using: str
) -> dict[Key, Any]:
    """Write rows by natural key; return natural key -> primary key where known.

    One multi-row upsert on the natural key where the database can match on it
    alone; otherwise (MySQL with another unique field, no unique index on the
    key) read which rows exist, insert the others, update these by primary key.
    The statements come from sql.py, shared with the full pull."""
    columns, updates, values = _row_values(options, rows, using)
    if sql.can_upsert(options, using):
        written = sql.plan_upsert(options, using, columns, updates).write(values, returning=True)
        if not written:
            return {}
        return {change.key: pk for (change, _), pk in zip(rows, written, strict=True)}
    existing = resolve_keys(options, [c.key for c, _ in rows], using)
    pk = options.model._meta.pk
    new = [row for (change, _), row in zip(rows, values) if change.key not in existing]
    old = [[existing[change.key], *row] for (change, _), row in zip(rows, values)
           if change.key in existing]  # fmt: skip
    if new:
        sql.plan_upsert(options, using, columns, [], match="none").write(new, returning=False)
    if old:
        sql.plan_upsert(options, using, [pk, *columns], updates, match="pk").write(
            old, returning=False
        )
    return existing


_PASS_THROUGH = frozenset(
    {
        "CharField",
        "TextField",
        "SlugField",
        "EmailField",
        "URLField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
        "ForeignKey",
    }
)


def _row_values(
    options: ModelOptions, rows: list[tuple[_Change, dict[str, Any]]], using: str
) -> tuple[list[Any], list[Any], list[list[Any]]]:
    """(columns, columns a row that exists gets updated, each row's values in column
    order). Values are adapted by each field's ``get_db_prep_save``, as the ORM
    does, except text and integers, which already are what the driver takes."""
    connection = connections[using]
    meta = options.model._meta
    unique = options.upsert_unique_fields or ()
    synced = {f.attname for f in options.concrete_fields}
    unique_attnames = {meta.get_field(name).attname for name in unique}  # type: ignore[union-attr]
    now = timezone.now()
    columns: list[Any] = []
    fixed: dict[str, Any] = {}  # columns not synced: their default, as a new row would get
    for f in meta.concrete_fields:
        if f.primary_key:
            continue
        if f.attname in synced:
            columns.append(f)
        elif getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False):
            columns.append(f)
            fixed[f.attname] = now
        elif getattr(f, "db_default", models.NOT_PROVIDED) is not models.NOT_PROVIDED:
            continue  # the database fills it
        else:
            columns.append(f)
            fixed[f.attname] = f.get_default()
    updates = [
        f
        for f in columns
        if f.attname not in unique_attnames
        and (f.attname in synced or getattr(f, "auto_now", False))
    ]
    # Columns not synced hold the same value in every row, adapted once. The columns
    # are listed as: taken as they are, adapted, constant; a row is three slices.
    as_is = [
        f
        for f in columns
        if f.attname not in fixed
        and f.get_internal_type() in _PASS_THROUGH
        and not getattr(f, "db_returning", False)
    ]
    adapt = [f for f in columns if f.attname not in fixed and f not in as_is]
    constant = [f for f in columns if f.attname in fixed]
    take = operator.itemgetter(*[f.attname for f in as_is]) if as_is else None
    constants = [f.get_db_prep_save(fixed[f.attname], connection) for f in constant]
    values_rows: list[list[Any]] = []
    for _, values in rows:
        row: list[Any] = []
        if take is not None:
            if len(as_is) == 1:
                row.append(take(values))
            else:
                row.extend(take(values))
        for f in adapt:
            row.append(f.get_db_prep_save(values[f.attname], connection))
        row.extend(constants)
        values_rows.append(row)
    return [*as_is, *adapt, *constant], updates, values_rows


def _current_links(
    through: Any, src: str, dst: str, owners: list[Any], using: str
) -> set[tuple[Any, Any]]:
    """(owner, other) pairs stored for ``owners``, in plain SQL: for a page of
    upserts the ORM's per-value lookup preparation cost more than the query."""
    connection = connections[using]
    qn = connection.ops.quote_name
    meta = through._meta
    src_column = qn(meta.get_field(src).column)
    sql = (
        f"SELECT {src_column}, {qn(meta.get_field(dst).column)} "
        f"FROM {qn(meta.db_table)} WHERE {src_column} IN "
    )
    current: set[tuple[Any, Any]] = set()
    with connection.cursor() as cursor:
        for chunk in chunked(owners, _max_params(using)):
            cursor.execute(sql + "(" + ", ".join(["%s"] * len(chunk)) + ")", chunk)
            current.update((a, b) for a, b in cursor.fetchall())
    return current


def _write_m2m(
    options: ModelOptions,
    changes: Sequence[_Change],
    using: str,
    own: dict[Key, Any] | None = None,
) -> None:
    if not options.m2m_fields or not changes:
        return
    if own is None or any(c.key not in own for c in changes):
        own = resolve_keys(options, [c.key for c in changes], using)
    for change in changes:
        if change.key not in own:  # written just before: only a broken write gets here
            raise ApplyError(
                "row to link is not on the target after its write",
                model=options.label,
                key=change.key,
                seq=change.seq,
            )
    for m2m in options.m2m_fields:
        rel_options = registry.get_options(m2m.related_model)
        through: Any = m2m.remote_field.through
        src, dst = m2m.m2m_field_name(), m2m.m2m_reverse_field_name()
        links: list[Any] = []
        wanted: dict[Any, list[Any]] = {}
        all_keys: set[Key] = set()
        name = m2m.name
        for change in changes:
            raw_keys = change.data[name]
            if not raw_keys:  # most rows: no links
                wanted[own[change.key]] = []
            elif rel_options is not None:
                keys = [normalize_key(rel_options, k) for k in raw_keys]
                all_keys.update(keys)
                wanted[own[change.key]] = keys
            else:
                wanted[own[change.key]] = [tuple(k) for k in raw_keys]
        if rel_options is not None:
            mapped = resolve_keys(rel_options, all_keys, using)
        else:
            manager = m2m.related_model._default_manager.db_manager(using)
            mapped = {}
            for keys in wanted.values():
                for k in keys:
                    try:
                        mapped[k] = manager.get_by_natural_key(*k).pk
                    except Exception:
                        pass
        for change in changes if all_keys or rel_options is None else ():
            for k in wanted[own[change.key]]:
                if k not in mapped:
                    raise ApplyError(
                        f"many-to-many natural key {list(k)!r} resolves to nothing",
                        model=options.label,
                        key=change.key,
                        field=m2m.name,
                        seq=change.seq,
                    )
        # Write only the difference: most upserts leave their links as they are.
        manager = through._base_manager.using(using)
        current = _current_links(through, src, dst, list(wanted), using)
        target = {(owner, mapped[k]) for owner, keys in wanted.items() for k in keys}
        stale = current - target
        if stale:
            by_owner: dict[Any, list[Any]] = defaultdict(list)
            for owner, other in stale:
                by_owner[owner].append(other)
            for owner, others in by_owner.items():
                manager.filter(**{f"{src}_id": owner, f"{dst}_id__in": others}).delete()
        for owner, other in sorted(target - current, key=repr):
            links.append(through(**{f"{src}_id": owner, f"{dst}_id": other}))
        if links:
            manager.bulk_create(links, batch_size=500)


def _apply_upserts(changes: list[_Change], using: str, stats: ApplyStats) -> None:
    """Write a coalesced run of upserts, parents first, in rounds for self-references."""
    by_model: dict[type[models.Model], list[_Change]] = defaultdict(list)
    for change in changes:
        by_model[change.options.model].append(change)
    order = model_order(by_model)
    # Rows of this run that other rows of it may point at (self-references, parents
    # written in the same run); a row pointing at one not yet written waits a round.
    pointed_at = {
        fk.related_model for model in by_model for fk in by_model[model][0].options.fk_fields
    }
    pending = {(c.options.label, c.key) for c in changes if c.options.model in pointed_at}
    while True:
        progress = False
        blocked: dict[type[models.Model], list[_Change]] = {}
        for model in order:
            todo = by_model.get(model) or []
            if not todo:
                continue
            options = todo[0].options
            fk_maps = _fk_maps(todo, using)
            ready: list[tuple[_Change, dict[str, Any]]] = []
            wait: list[_Change] = []
            for change in todo:
                try:
                    ready.append((change, _build_values(change, using, fk_maps, pending)))
                except _Pending:
                    wait.append(change)
            if ready:
                pks = _write_rows(options, ready, using)
                _write_m2m(options, [c for c, _ in ready], using, pks)
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


def _apply_deletes(changes: list[_Change], using: str, stats: ApplyStats) -> None:
    by_model: dict[type[models.Model], list[_Change]] = defaultdict(list)
    for change in changes:
        by_model[change.options.model].append(change)
    for model in reversed(model_order(by_model)):
        options = by_model[model][0].options
        pks = list(resolve_keys(options, [c.key for c in by_model[model]], using).values())
        for chunk in chunked(pks, 500):
            model._base_manager.using(using).filter(pk__in=chunk).delete()
        stats.deleted[options.label] += len(pks)


def _apply_rename(change: _Change, using: str, stats: ApplyStats) -> None:
    """Rename a row in place: same primary key, so nothing that points at it cascades."""
    options = change.options
    assert change.old_key is not None
    found = resolve_keys(options, [change.old_key, change.key], using)
    old_pk, new_pk = found.get(change.old_key), found.get(change.key)
    if old_pk is None or new_pk is not None:
        # Nothing to rename (never had it, or already renamed): a plain upsert.
        _apply_upserts([change], using, stats)
        return
    manager = options.model._base_manager.using(using)
    fk_maps = _fk_maps([change], using)
    try:
        values = _build_values(change, using, fk_maps, set())
    except ApplyError:
        # The row may point at a row whose natural key goes through this one (a
        # nation's capital is one of its regions, keyed by the nation's code): the
        # event names it by its new key, which exists once this row has its new
        # key. So the key first, then the rest.
        manager.filter(pk=old_pk).update(**_key_values(change, fk_maps))
        values = _build_values(change, using, _fk_maps([change], using), set())
    manager.filter(pk=old_pk).update(**values)
    _write_m2m(options, [change], using)
    stats.upserted[options.label] += 1


def _key_values(change: _Change, fk_maps: dict[str, dict[Key, Any]]) -> dict[str, Any]:
    """The columns a row's natural key starts from, by attname, from an event."""
    options = change.options
    values: dict[str, Any] = {}
    for head in options.key_heads:
        f: Any = options.model._meta.get_field(head)
        raw = change.data[head]
        if not f.is_relation:
            values[f.attname] = decode_value(f, raw)
            continue
        value = None if raw is None else fk_maps.get(f.name, {}).get(tuple(raw))
        if value is None and raw is not None:
            raise ApplyError(
                f"foreign natural key {raw!r} resolves to nothing",
                model=options.label,
                key=change.key,
                field=f.name,
                seq=change.seq,
            )
        values[f.attname] = value
    return values


def _flush(run: list[_Change], using: str, stats: ApplyStats) -> None:
    if not run:
        return
    last: dict[tuple[str, Key], _Change] = {}
    for change in run:
        # The last change of a key wins, in the position of that last change.
        coalesce_key = (change.options.label, change.key)
        if coalesce_key in last:
            del last[coalesce_key]
        last[coalesce_key] = change
    coalesced = list(last.values())
    if run[0].op == Event.UPSERT:
        _apply_upserts(coalesced, using, stats)
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
    changes = [_parse_common(raw, labels) for raw in events]
    stats = ApplyStats(events=len(changes))
    with applying():
        try:
            with transaction.atomic(using=using):
                _apply_merged(changes, using, stats)
        except (IntegrityError, DataError, ApplyError):
            stats = ApplyStats(events=len(changes))
            _apply_in_order(changes, using, stats)
    if relay and changes:
        # This site is a source for others too: pass the changes on (chained replication).
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
    return stats


def _apply_merged(changes: list[_Change], using: str, stats: ApplyStats) -> None:
    run: list[_Change] = []
    for change in changes:
        if change.old_key is not None and change.old_key != change.key:
            _flush(run, using, stats)
            _apply_rename(change, using, stats)
            continue
        if run and run[0].op != change.op:
            _flush(run, using, stats)
        run.append(change)
    _flush(run, using, stats)


def _apply_in_order(changes: list[_Change], using: str, stats: ApplyStats) -> None:
    """One event at a time, in feed order; an event the target refuses stops the
    page with an error naming its model, key, field and position."""
    for change in changes:
        try:
            with transaction.atomic(using=using):
                if change.old_key is not None and change.old_key != change.key:
                    _apply_rename(change, using, stats)
                elif change.op == Event.UPSERT:
                    _apply_upserts([change], using, stats)
                else:
                    _apply_deletes([change], using, stats)
        except (IntegrityError, DataError) as exc:
            raise refused(change, exc, using) from exc


def refused(change: _Change, exc: Exception, using: str) -> ApplyError:
    """What the database refused in ``change``, said in the domain's words: the
    unique field whose value another row holds (and that row's key), or the field
    whose value the column cannot store."""
    options = change.options
    model = options.model
    values = _build_values(change, using, _fk_maps([change], using), set())
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
            from .signing import remember_nonce

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
