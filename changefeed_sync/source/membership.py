"""Which filtered Targets a row belongs to, and which rows a write can move.

Capture (routes.py, cascades.py) asks, before and after a write, which Targets' filters
hold the rows it writes (``members``), and which rows of other models a write to a
parent moves (``filter_paths``, ``dependent_pks``): a filter through a foreign key
(``language__country__code``) reads the parent, so a country's new code moves its
languages' and copies' rows in or out.

Membership is decided by the database, with the very ``Q`` the snapshot filters
its pages with (``Selection``), so a row is in a Target's feed exactly when it
would be in its Data Pull, collations and all. One statement per chunk of rows (a
UNION ALL: which of them exist, and one SELECT per Target of those its Q selects),
compiled once per shape: the cost grows with the rows written and the Targets,
never with the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import IntegerField, Q, Value
from django.db.models.constants import LOOKUP_SEP

from .. import registry
from ..exceptions import RowFiltersInvalid
from ..models import Target
from ..registry import ModelOptions
from ..selection import Selection
from ..serialization import chunked

CHUNK = 500  # rows per membership query


@dataclass(frozen=True)
class Reader:
    """A Target with row filters, as routing sees it: its id and what it reads.
    ``selection`` is None when its saved filters are invalid (E011): it reads
    nothing, rather than rows its filters were meant to hold back."""

    target_id: int
    selection: Selection | None

    def reads(self, label: str) -> bool:
        return self.selection is not None and self.selection.offers(label)


def readers(using: str) -> list[Reader]:
    """The active Targets of database ``using`` whose row filters restrict some rows."""
    found = []
    for target in Target.objects.using(using).filter(active=True).order_by("pk"):
        try:
            selection = Selection.of(target)
        except RowFiltersInvalid:
            selection = None
        if selection is None or selection.filtered:
            found.append(Reader(target.pk, selection))
    return found


def members(
    options: ModelOptions, pks: Sequence[Any], using: str, among: Iterable[Reader]
) -> dict[Any, frozenset[int]]:
    """For each primary key of ``pks`` that exists, the ids of the Targets of ``among``
    whose selection holds that row (a row missing from the table belongs to none)."""
    label = options.label
    concerned = [r for r in among if r.reads(label)]
    result: dict[Any, frozenset[int]] = {}
    unfiltered = frozenset(
        r.target_id for r in concerned if r.selection and r.selection.rows_filter(label) is None
    )
    filtered: list[tuple[int, Q]] = []
    for reader in concerned:
        q = reader.selection.rows_filter(label) if reader.selection else None
        if q is not None:
            filtered.append((reader.target_id, q))
    connection = connections[using]
    to_key = options.model._meta.pk.to_python  # as the ORM gives keys (a UUID, not its text)
    for chunk in chunked(list(pks), CHUNK):
        sql, params = _statement(options, using, filtered, chunk)
        found: dict[Any, set[int]] = {}
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            for pk, target_id in cursor.fetchall():
                pk = to_key(pk)
                found.setdefault(pk, set(unfiltered))
                if target_id:
                    found[pk].add(int(target_id))
        result.update((pk, frozenset(ids)) for pk, ids in found.items())
    return result


# Compiled statements by model, Targets' filters and number of rows: capture asks
# before and after every write of a filtered model, and compiling a UNION of one
# filtered query per Target cost more than running it.
_statements: dict[tuple[Any, ...], tuple[str, list[Any], list[tuple[int, int]]]] = {}
_PLACEHOLDER = -(2**62)  # primary keys while compiling: values no row has
_INTEGER_KEYS = {"AutoField", "BigAutoField", "SmallAutoField", "IntegerField", "BigIntegerField",
                 "SmallIntegerField", "PositiveIntegerField", "PositiveBigIntegerField",
                 "PositiveSmallIntegerField"}  # fmt: skip


def _statement(
    options: ModelOptions, using: str, filtered: list[tuple[int, Q]], chunk: list[Any]
) -> tuple[str, list[Any]]:
    """One statement: (pk, 0) for each row of ``chunk`` that exists, and (pk, target id)
    for each Target whose Q selects it, each compiled as the snapshot's filter() is (a
    CASE WHEN of the same Q is not: Django cannot compile an empty "__in" there on
    MariaDB). Compiled once per shape, then given the chunk's keys."""
    key = (using, options.label, tuple((tid, repr(q)) for tid, q in filtered), len(chunk))
    integer_keys = options.model._meta.pk.get_internal_type() in _INTEGER_KEYS
    found = _statements.get(key) if integer_keys else None
    if found is None:
        # Other primary keys (UUIDs, text) are compiled with the chunk itself, each time.
        marks = [_PLACEHOLDER - i for i in range(len(chunk))] if integer_keys else chunk
        manager = options.model._base_manager.using(using)
        parts = [manager.filter(pk__in=marks).values_list("pk", _tag(0))] + [
            manager.filter(q, pk__in=marks).values_list("pk", _tag(tid)) for tid, q in filtered
        ]
        query = parts[0].union(*parts[1:], all=True).query
        sql, compiled = query.get_compiler(using).as_sql()
        slots = [
            (i, _PLACEHOLDER - value)
            for i, value in enumerate(compiled)
            if isinstance(value, int) and _PLACEHOLDER - len(chunk) < value <= _PLACEHOLDER
        ]
        if not integer_keys:
            return sql, list(compiled)
        if len(_statements) >= 512:
            _statements.clear()
        found = _statements[key] = (sql, list(compiled), slots)
    sql, template, slots = found
    params = list(template)
    for index, which in slots:
        params[index] = chunk[which]
    return sql, params


def _tag(target_id: int) -> Value:
    return Value(target_id, output_field=IntegerField())


@dataclass(frozen=True)
class Dependent:
    """Rows of ``child`` whose filter reads ``field`` of ``parent`` through foreign
    keys: the child rows ``<via>__in=[parent pks]`` (``via``: the lookup path from
    the child to the parent)."""

    child: str
    via: str
    parent: str
    field: str


def filter_paths(among: Iterable[Reader]) -> list[Dependent]:
    """Every (child, path, parent, field) some reader's filter reads across a foreign
    key, once each: the writes to ``parent.field`` that can move ``child`` rows."""
    found: dict[tuple[str, str, str, str], Dependent] = {}
    for reader in among:
        if reader.selection is None:
            continue
        for label, q in reader.selection.row_filters.items():
            options = registry.options_for_label(label)
            if options is None:
                continue
            for lookup in lookups(q):
                for dependent in _hops(options, lookup):
                    key = (dependent.child, dependent.via, dependent.parent, dependent.field)
                    found.setdefault(key, dependent)
    return sorted(found.values(), key=lambda d: (d.parent, d.field, d.child, d.via))


def dependents_of(
    parent: ModelOptions, changed: Iterable[str] | None, among: Iterable[Reader]
) -> list[Dependent]:
    """The paths by which a write to ``parent`` changing the fields ``changed`` (names;
    None: any, as for a new or deleted row) can move rows of other models."""
    names = None if changed is None else set(changed)
    return [
        d
        for d in filter_paths(among)
        if d.parent == parent.label and (names is None or d.field in names)
    ]


def dependent_pks(dependent: Dependent, parent_pks: Sequence[Any], using: str) -> list[Any]:
    """Primary keys of the ``dependent.child`` rows that point, along ``dependent.via``,
    at one of ``parent_pks``."""
    options = registry.options_for_label(dependent.child)
    if options is None:
        return []
    manager = options.model._base_manager.using(using)
    found: list[Any] = []
    for chunk in chunked(list(parent_pks), CHUNK):
        lookup = f"{dependent.via}__in"
        found += manager.filter(**{lookup: chunk}).values_list("pk", flat=True).order_by("pk")
    return found


def lookups(q: Q) -> list[str]:
    """The lookup strings of a ``Q`` (nested ones included)."""
    found: list[str] = []
    for child in q.children:
        if isinstance(child, Q):
            found += lookups(child)
        elif isinstance(child, tuple):
            found.append(str(child[0]))
    return found


def _hops(options: ModelOptions, lookup: str) -> list[Dependent]:
    """For ``language__country__code__in`` on Copy: Copy's ``language`` (its own
    column: no dependent), Language's ``country`` via ``language``, Country's
    ``code`` via ``language__country``. Filters were validated (filters.py): every
    hop is a forward foreign key to a registered model."""
    found: list[Dependent] = []
    parts = lookup.split(LOOKUP_SEP)
    current = options
    path: list[str] = []
    for name in parts:
        try:
            field: Any = current.model._meta.get_field(name)
        except Exception:  # the lookup name at the end ("in", "exact")
            break
        if path:
            found.append(Dependent(options.label, LOOKUP_SEP.join(path), current.label, field.name))
        if not field.is_relation:
            break
        related = registry.get_options(field.related_model)
        if related is None:
            break
        path.append(name)
        current = related
    return found
