"""Many-to-many links of incoming rows: each row's links become exactly the ones its
event lists, by the linked rows' natural keys."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from django.db import connections

from .. import registry
from ..exceptions import ApplyError
from ..keys import max_params, resolve_keys
from ..registry import Key, ModelOptions
from ..serialization import chunked, normalize_key
from .changes import IncomingChange


def write_m2m(
    options: ModelOptions,
    changes: Sequence[IncomingChange],
    using: str,
    own: dict[Key, Any] | None = None,
) -> None:
    """Set the links of every many-to-many field of ``changes``, rows written just
    before (``own``: their natural key -> primary key, where the write told it).
    Every link of a field is checked before any of it is written."""
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
        wanted, mapped = _wanted_links(options, m2m, changes, own, using)
        _write_links(m2m, wanted, mapped, using)


def _wanted_links(
    options: ModelOptions,
    m2m: Any,
    changes: Sequence[IncomingChange],
    own: dict[Key, Any],
    using: str,
) -> tuple[dict[Any, list[Key]], dict[Key, Any]]:
    """(owner's primary key -> natural keys of the rows it links to, natural key ->
    primary key of those rows here); a key that resolves to nothing is refused."""
    rel_options = registry.get_options(m2m.related_model)
    wanted: dict[Any, list[Key]] = {}
    all_keys: set[Key] = set()
    for change in changes:
        raw_keys = change.data[m2m.name]
        if not raw_keys:  # most rows: no links
            wanted[own[change.key]] = []
        elif rel_options is not None:
            keys = [normalize_key(rel_options, k) for k in raw_keys]
            all_keys.update(keys)
            wanted[own[change.key]] = keys
        else:
            wanted[own[change.key]] = [tuple(k) for k in raw_keys]
    mapped: dict[Key, Any]
    if rel_options is not None:
        mapped = resolve_keys(rel_options, all_keys, using)
    else:  # not registered: Django's own natural keys, one row at a time
        manager = m2m.related_model._default_manager.db_manager(using)
        mapped = {}
        for keys in wanted.values():
            for k in keys:
                try:
                    mapped[k] = manager.get_by_natural_key(*k).pk
                except Exception:  # reported below, with the row that names it
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
    return wanted, mapped


def _write_links(
    m2m: Any, wanted: dict[Any, list[Key]], mapped: dict[Key, Any], using: str
) -> None:
    """Make the through table hold exactly the ``wanted`` links of these owners.
    Only the difference is written: most upserts leave their links as they are."""
    through: Any = m2m.remote_field.through
    src, dst = m2m.m2m_field_name(), m2m.m2m_reverse_field_name()
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
    links = [
        through(**{f"{src}_id": owner, f"{dst}_id": other})
        for owner, other in sorted(target - current, key=repr)
    ]
    if links:
        manager.bulk_create(links, batch_size=500)


def _current_links(
    through: Any, src: str, dst: str, owners: list[Any], using: str
) -> set[tuple[Any, Any]]:
    """(owner, other) pairs stored for ``owners``, in plain SQL: for a page of
    upserts the ORM's per-value lookup preparation cost more than the query."""
    connection = connections[using]
    qn = connection.ops.quote_name
    meta = through._meta
    src_column = qn(meta.get_field(src).column)
    statement = (
        f"SELECT {src_column}, {qn(meta.get_field(dst).column)} "
        f"FROM {qn(meta.db_table)} WHERE {src_column} IN "
    )
    current: set[tuple[Any, Any]] = set()
    with connection.cursor() as cursor:
        for chunk in chunked(owners, max_params(using)):
            cursor.execute(statement + "(" + ", ".join(["%s"] * len(chunk)) + ")", chunk)
            current.update((a, b) for a, b in cursor.fetchall())
    return current
