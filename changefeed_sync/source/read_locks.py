"""Locks on what an event is built from, so the feed's order never contradicts it.

Writers take no lock among themselves (``outbox``), so two transactions can
interleave in a way no single order of their events explains. Transaction A
saves a copy and names its language by natural key, read as ``fr``; B renames
that language to ``fx`` and commits first. B's rename gets the earlier
position, and A's copy, pointing at ``fr``, arrives at a target that has no
``fr`` any more. Or A and B each add a tag to the same copy: each event lists
the tags its transaction saw, and the later position wins with one tag
missing.

The cure is the one foreign keys use: a transaction that builds an event of
row X first locks X (for update: events of one row are written one
transaction at a time) and then, for key share, every row whose natural key
the event carries — the rows X's foreign keys and many-to-many links point at,
and the rows their own natural keys go through. A rename or a delete of such a
row then waits until the event's transaction ends (or the event's
transaction waits for the rename and reads the new key), so the order of
commits is one the events agree with. Updates of other columns, and other
writers of other rows, do not wait.

PostgreSQL: ``FOR NO KEY UPDATE`` on X, ``FOR KEY SHARE`` on the rest (what
its own foreign-key checks take: they conflict only with deletes and with
changes of columns in a unique index, which natural keys are). MySQL and
MariaDB: ``FOR UPDATE`` and ``LOCK IN SHARE MODE``. SQLite runs one writer at
a time: nothing to lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connections, models

from .. import registry
from ..keys import max_params
from ..serialization import chunked

_EXCLUSIVE = {"postgresql": " FOR NO KEY UPDATE", "mysql": " FOR UPDATE"}
_SHARE = {"postgresql": " FOR KEY SHARE", "mysql": " LOCK IN SHARE MODE"}


def lock_for_events(
    model: type[models.Model], pks: Sequence[Any], using: str, *, rows: bool = True
) -> None:
    """Lock, in the current transaction, what events of ``model``'s rows ``pks``
    are built from: the rows themselves (unless ``rows`` is false: the caller
    has written them, which locked them already) and, for key share, every row
    their natural keys and relations name."""
    connection = connections[using]
    if connection.vendor not in _SHARE or not pks:
        return
    links = _event_links(model)
    if not rows and not links:
        return
    if rows:
        _select(connection, model, list(pks), (), _EXCLUSIVE[connection.vendor])
    if links:
        _follow(connection, model, list(pks), links, seen=set())


def _follow(
    connection: Any,
    model: type[models.Model],
    pks: list[Any],
    links: tuple[Any, ...],
    seen: set[tuple[str, Any]],
) -> None:
    """Lock the rows ``links`` (fields of ``model``) point at from rows ``pks``
    (locked already), then, level by level, the rows their keys go through."""
    share = _SHARE[connection.vendor]
    fks = [f for f in links if not f.many_to_many]
    wanted: dict[type[models.Model], set[Any]] = {}
    if fks:
        for row in _select(connection, model, pks, [f.column for f in fks], ""):
            for f, value in zip(fks, row[1:], strict=True):
                if value is not None:
                    wanted.setdefault(f.related_model, set()).add(value)
    for m2m in (f for f in links if f.many_to_many):
        through = m2m.remote_field.through
        source = through._meta.get_field(m2m.m2m_field_name()).column
        target = through._meta.get_field(m2m.m2m_reverse_field_name()).column
        for chunk in chunked(pks, _in_list_size(connection)):
            qn = connection.ops.quote_name
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT {qn(target)} FROM {qn(through._meta.db_table)} "
                    f"WHERE {qn(source)} IN ({', '.join(['%s'] * len(chunk))})",
                    chunk,
                )
                wanted.setdefault(m2m.related_model, set()).update(r[0] for r in cursor)
    for related, values in wanted.items():
        fresh = [v for v in values if (related._meta.label, v) not in seen]
        if not fresh:
            continue
        seen.update((related._meta.label, v) for v in fresh)
        deeper = _key_links(related)
        columns = [f.column for f in deeper]
        found = _select(connection, related, fresh, columns, share)
        if deeper:
            _follow(connection, related, [r[0] for r in found], deeper, seen)


def _select(
    connection: Any,
    model: type[models.Model],
    pks: list[Any],
    columns: Iterable[str],
    lock: str,
) -> list[tuple[Any, ...]]:
    """``SELECT pk, columns FROM model WHERE pk IN pks`` with the lock clause, in chunks."""
    qn = connection.ops.quote_name
    pk = qn(model._meta.pk.column)
    selected = ", ".join([pk, *(qn(c) for c in columns)])
    out: list[tuple[Any, ...]] = []
    for chunk in chunked(sorted(pks, key=repr), _in_list_size(connection)):
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {selected} FROM {qn(model._meta.db_table)} "
                f"WHERE {pk} IN ({', '.join(['%s'] * len(chunk))}){lock}",
                chunk,
            )
            out.extend(cursor.fetchall())
    return out


def _in_list_size(connection: Any) -> int:
    """Values per ``IN (...)`` list: what one statement may bind, at most 1,000."""
    return max(1, min(max_params(connection.alias), 1000))


def _event_links(model: type[models.Model]) -> tuple[Any, ...]:
    """The fields of a registered model whose targets its events name: its synced
    foreign keys (its key's among them) and many-to-many fields."""
    options = registry.get_options(model)
    if options is None:
        return ()
    return (*options.fk_fields, *options.m2m_fields)


def _key_links(model: type[models.Model]) -> tuple[Any, ...]:
    """The foreign keys a related row's natural key goes through (none for an
    unregistered model, whose ``natural_key()`` is its own business)."""
    options = registry.get_options(model)
    if options is None:
        return ()
    heads = set(options.key_heads)
    return tuple(f for f in options.fk_fields if f.name in heads)


def lock_rows(model: type[models.Model], pks: Sequence[Any], using: str, *, share: bool) -> None:
    """Lock rows ``pks`` of ``model`` for update, or for share against any change of them
    (PostgreSQL ``FOR SHARE``, stronger than the key share above): the row filters of
    other models read their columns (source/routes.py)."""
    connection = connections[using]
    if connection.vendor not in _SHARE or not pks:
        return
    lock = {"postgresql": " FOR SHARE", "mysql": " LOCK IN SHARE MODE"}[connection.vendor]
    _select(connection, model, list(pks), (), lock if share else _EXCLUSIVE[connection.vendor])
