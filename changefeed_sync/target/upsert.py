"""Writing a run of incoming rows by natural key, in bulk statements (sql.py's)."""

from __future__ import annotations

import operator
from typing import Any

from django.db import connections, models
from django.utils import timezone

from .. import sql
from ..keys import resolve_keys
from ..registry import Key, ModelOptions
from .changes import IncomingChange


def write_rows(
    options: ModelOptions, rows: list[tuple[IncomingChange, dict[str, Any]]], using: str
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


# Columns whose value, as build_values makes it, already is what the driver takes.
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
    options: ModelOptions, rows: list[tuple[IncomingChange, dict[str, Any]]], using: str
) -> tuple[list[Any], list[Any], list[list[Any]]]:
    """(columns, columns a row that exists gets updated, each row's values in column
    order). Values are adapted by each field's ``get_db_prep_save``, as the ORM
    does, except text and integers, which already are what the driver takes."""
    connection = connections[using]
    columns, fixed = _columns(options)
    unique = options.upsert_unique_fields or ()
    synced = {f.attname for f in options.concrete_fields}
    meta = options.model._meta
    unique_attnames = {meta.get_field(name).attname for name in unique}  # type: ignore[union-attr]
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


def _columns(options: ModelOptions) -> tuple[list[Any], dict[str, Any]]:
    """The columns a write sets (all but the primary key and those the database
    fills), and the value of each one not synced: what a new row would get."""
    synced = {f.attname for f in options.concrete_fields}
    now = timezone.now()
    columns: list[Any] = []
    fixed: dict[str, Any] = {}
    for f in options.model._meta.concrete_fields:
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
    return columns, fixed
