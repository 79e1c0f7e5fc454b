"""The one place that builds the statements writing rows by natural key.

Apply (feed pages and pushes) and the full pull write many rows at a time
with raw multi-row statements, because compiling a model instance per row
through the ORM cost more than the database's own work. Both get their
statement from here, built on Django's ``connection.ops``, so a rule about
how a row is matched holds for both:

* A row is matched by its natural key only. ``INSERT ... ON CONFLICT (key)
  DO UPDATE`` (PostgreSQL, SQLite) names the key's columns; a clash on any
  other unique field is an error, not an update of another row. MySQL's
  ``ON DUPLICATE KEY UPDATE`` matches a row on *any* unique key, so it is
  used only for models whose natural key is their only unique key besides
  the primary key (:func:`can_upsert`); other models are written by key
  (read, insert the new rows, update the others).
* Models MySQL cannot upsert that way are written in two statements: new
  rows as plain ``INSERT`` (a clash on any unique field is an error), rows
  already here by their primary key (``match="pk"``: the primary key is the
  conflict MySQL meets first, and the update it then makes is checked against
  every other unique key like any UPDATE).
* A row whose every synced column is part of the key is "updated" by setting
  the key to itself, never with ``INSERT IGNORE`` (MySQL downgrades errors
  such as a value too long to warnings under IGNORE, and keeps a cut value).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models.constants import OnConflict

from .keys import max_params
from .registry import ModelOptions
from .serialization import chunked

Field = Any  # a concrete model field (django-stubs' Field is generic over two types)


def can_upsert(options: ModelOptions, using: str) -> bool:
    """Whether rows of this model can be written with one ``INSERT ... ON CONFLICT``
    on the natural key on ``using`` (see the module docstring)."""
    connection = connections[using]
    vendor = connection.vendor
    return (
        options.upsert_unique_fields is not None
        and vendor in ("postgresql", "sqlite", "mysql")
        and bool(connection.features.supports_update_conflicts)
        and not (vendor == "mysql" and options.other_unique_groups)
    )


@dataclass(frozen=True)
class Upsert:
    """A multi-row upsert of one model's ``columns``, in that order."""

    using: str
    columns: tuple[Field, ...]
    head: str  # INSERT INTO table (columns) VALUES
    row: str  # (%s, %s, ...)
    suffix: str  # ON CONFLICT (key) DO UPDATE SET ... / ON DUPLICATE KEY UPDATE ...
    returning: str  # RETURNING pk, where the database returns written rows in order
    per_statement: int
    unnest: str | None  # PostgreSQL: one array parameter per column instead

    def write(self, rows: Sequence[Sequence[Any]], *, returning: bool) -> list[Any]:
        """Write ``rows`` (values in column order, ready for the driver); return the
        primary keys of the rows written, in order, when ``returning`` and the
        database tells them (else an empty list)."""
        returning = returning and bool(self.returning)
        tail = self.suffix + (self.returning if returning else "")
        written: list[Any] = []
        with connections[self.using].cursor() as cursor:
            if self.unnest is not None and rows:
                cursor.execute(self.unnest + tail, [list(column) for column in zip(*rows)])
                if returning:
                    written.extend(r[0] for r in cursor.fetchall())
                return written
            for chunk in chunked(list(rows), self.per_statement):
                params = [value for row in chunk for value in row]
                cursor.execute(self.head + ", ".join([self.row] * len(chunk)) + tail, params)
                if returning:
                    written.extend(r[0] for r in cursor.fetchall())
        return written


def plan_upsert(
    options: ModelOptions,
    using: str,
    columns: Sequence[Field],
    update: Sequence[Field],
    *,
    match: str = "key",
    unnest: bool = False,
) -> Upsert:
    """The statement writing ``columns`` of ``options.model``, matching a row that
    exists by ``match`` and then setting ``update`` (the matched columns themselves
    when empty):

    * ``"key"``: by natural key, for models :func:`can_upsert` accepts;
    * ``"pk"``: by primary key, the first of ``columns`` (rows known to be here);
    * ``"none"``: a plain ``INSERT`` (rows known to be new; any clash is an error).

    ``unnest`` asks for PostgreSQL's one array per column where every column's
    type allows it."""
    connection = connections[using]
    ops = connection.ops
    qn = ops.quote_name
    meta = options.model._meta
    pk = meta.pk
    assert pk is not None
    if match == "key":
        unique = options.upsert_unique_fields
        assert unique is not None and can_upsert(options, using), options.label
        key_columns = [str(meta.get_field(name).column) for name in unique]  # type: ignore[union-attr]
    elif match == "pk":
        assert columns[0] is pk, "match='pk' needs the primary key as the first column"
        key_columns = [str(pk.column)]
    else:
        assert match == "none", match
        key_columns = []
    if key_columns:
        update_columns = [str(f.column) for f in update] or key_columns
        suffix = ops.on_conflict_suffix_sql(
            list(columns), OnConflict.UPDATE, update_columns, key_columns
        )
        verb = ops.insert_statement(on_conflict=OnConflict.UPDATE)
    else:
        suffix, verb = "", ops.insert_statement()
    head = f"{verb} {qn(meta.db_table)} ({', '.join(qn(str(f.column)) for f in columns)}) "
    # Rows come back in VALUES order (bulk_create relies on it too); MySQL returns none.
    returning = (
        f" RETURNING {qn(str(pk.column))}"
        if connection.vendor in ("postgresql", "sqlite")
        and connection.features.can_return_rows_from_bulk_insert
        else ""
    )
    array_sql = None
    if unnest and connection.vendor == "postgresql":
        types = [_array_type(f.db_type(connection)) for f in columns]
        if (
            all(t and "[" not in t for t in types)
            # As Django's own bulk insert: only standard types, one placeholder each.
            and not any(hasattr(f, "get_placeholder") for f in columns)
            and all(
                (f.target_field if f.is_relation else f).get_internal_type()
                in connection.data_types
                for f in columns
            )
        ):
            array_sql = f"{head}SELECT * FROM unnest({', '.join(f'%s::{t}[]' for t in types)})"
    return Upsert(
        using=using,
        columns=tuple(columns),
        head=head + "VALUES ",
        row="(" + ", ".join(["%s"] * len(columns)) + ")",
        suffix=" " + suffix if suffix else "",
        returning=returning,
        per_statement=max(1, min(500, max_params(using) // max(len(columns), 1))),
        unnest=array_sql,
    )


def _array_type(db_type: str | None) -> str | None:
    """The element type to cast a column's array to, without its length or precision:
    an explicit cast to varchar(2) would silently cut 'abc' to 'ab', where assigning
    the value to the column refuses it, as a plain INSERT does."""
    if db_type is None:
        return None
    base = re.sub(r"\(.*?\)", "", db_type).strip()
    return "text" if base in ("char", "character", "varchar", "character varying") else base


def integer_range(connection: Any, internal_type: str) -> tuple[int, int]:
    """The integers a column of ``internal_type`` stores on ``connection``: its
    database's range, within 64 bits (SQLite names no range, its driver stops there)."""
    try:
        low, high = connection.ops.integer_field_range(internal_type)
    except KeyError:
        low = high = None
    return (
        max(low, -(2**63)) if low is not None else -(2**63),
        min(high, 2**63 - 1) if high is not None else 2**63 - 1,
    )
