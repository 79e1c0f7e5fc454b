"""One model of a pull: its state across the pull, and the writer of its pages.

Where the model allows it, a page's rows are written with one raw multi-row
upsert (sql.py's statement, one array per column on PostgreSQL). A nullable
foreign key to a row not written yet (a self-reference to a later page, a cycle
between models) is written null and set by a second pass over the model once
every row is there; so is a many-to-many link to such a row.

MySQL/MariaDB: ``ON DUPLICATE KEY UPDATE`` matches any unique key, so a new row
holding another row's unique value would silently overwrite that row. There, new
rows are plain inserts (a clash is an IntegrityError, handled by the page's
write) and rows already here are upserted by their primary key, which is checked
before any other unique key.
"""

from __future__ import annotations

from typing import Any

from django.db import connections, models

from ... import registry, sql
from ...digests import DigestReader
from ...exceptions import ApplyError
from ...keys import resolve_keys
from ...registry import Key, ModelOptions
from ...rows import RowReader, plain_text
from ...serialization import decode_value, normalize_key
from ..apply import ApplyStats, apply_upserts
from ..changes import IncomingChange
from ..links import write_m2m
from .moves import Moves
from .seen import Seen


class ModelWriter:
    """What a pull needs per model, worked out once: the temporary table of rows seen,
    and, when the model allows it, a one-query read of the target's current rows and
    a raw multi-row upsert. Anything unusual (many-to-many fields, a foreign key to an
    unregistered model, a non-auto primary key, auto_now fields, inheritance, no unique
    constraint on the natural key) goes through apply's general path instead."""

    def __init__(self, options: ModelOptions, using: str, index: int, relay: bool) -> None:
        self.options = options
        self.using = using
        # This site is a source for others too: what the pull writes goes into its outbox.
        self.relay = relay
        self.seen = Seen(options, using, index)
        self.connection = connections[using]
        self.reader = DigestReader(options, using)
        self.fk_readers = [
            (fk, RowReader(rel, using) if rel is not None else None) for fk, rel in self.reader.fks
        ]
        self.plain = [(f, f.name, plain_text(f)) for f in options.plain_fields]
        # Integer keys need no preparing: the value read is the value written.
        self.int_fk = {
            fk: isinstance(fk.target_field, models.IntegerField) for fk, _ in self.fk_readers
        }
        self.by_pk: sql.Upsert | None = None
        self.insert_sql, self.fixed = self._upsert_sql()
        # A table empty when the pull starts has none of the keys, and ends with only
        # rows the source has: no need to look them up, nor to track them for deletes.
        self.was_empty = not options.model._base_manager.using(using).exists()
        # Nullable foreign keys left null because their row was not there yet, and
        # whether the second pass that sets them is running.
        self.deferred = False
        self.relinking = False
        # Of the last write(): index of a change -> its foreign keys written null and
        # its many-to-many links left out for now (what a relay's event of that write
        # must say too).
        self.overrides: dict[int, dict[str, Any]] = {}
        # After a digest comparison: the query parameters that ask the source for the
        # rows of the buckets that differ (None: every row is asked for).
        self.only: dict[str, Any] | None = None
        self.differ: tuple[int, frozenset[int]] = (0, frozenset())
        # Rows moved out of the way of an incoming row's unique value.
        self.moves = Moves(options, using)

    def _upsert_sql(self) -> tuple[sql.Upsert | None, list[Any]]:
        """The statement writing a page's rows (sql.py builds it) and the values of
        unsynced columns (their constant defaults); (None, []) when the model needs
        the general path."""
        from django.db.models import AutoField, BigAutoField, SmallAutoField

        options, connection = self.options, self.connection
        meta = options.model._meta
        pk = meta.pk
        unique = options.upsert_unique_fields
        if (
            pk is None
            or unique is None
            or connection.vendor not in ("sqlite", "postgresql", "mysql")
            or not connection.features.supports_update_conflicts
            or meta.parents
            or not isinstance(pk, AutoField | BigAutoField | SmallAutoField)
        ):
            return None, []
        synced = set(options.concrete_fields)
        fixed = []
        for f in meta.concrete_fields:
            if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False):
                return None, []
            if f.primary_key or f in synced:
                continue
            if (
                getattr(f, "db_default", None) is not None
                and f.db_default is not models.NOT_PROVIDED
            ):
                return None, []
            if f.has_default() and not callable(f.default):
                fixed.append((f, f.get_db_prep_save(f.get_default(), connection)))
            elif f.null and not f.has_default():
                fixed.append((f, None))
            else:
                return None, []
        fields = [*options.plain_fields, *options.fk_fields, *(f for f, _ in fixed)]  # as _values
        values = [value for _, value in fixed]
        if sql.can_upsert(options, self.using):
            update = [f for f in options.concrete_fields if f.name not in unique]
            return sql.plan_upsert(options, self.using, fields, update, unnest=True), values
        # MySQL with unique fields besides the natural key: see write().
        self.by_pk = sql.plan_upsert(
            options, self.using, [pk, *fields], list(options.concrete_fields), match="pk"
        )
        return sql.plan_upsert(options, self.using, fields, [], match="none"), values

    def write(
        self, changes: list[IncomingChange], pks: list[Any], want_pks: bool = True
    ) -> list[Any] | None:
        """Upsert the rows (``pks``: each one's primary key here, None for a new row);
        return the primary keys written, or None when they are not known (MySQL), not
        wanted, or when the general path had to do the work."""
        self.overrides = {}
        if self.insert_sql is None:
            apply_upserts(changes, self.using, ApplyStats())
            return None
        rows = self._values(changes)
        if rows is None:  # a foreign key to a row not written yet: rounds, in apply
            self.overrides = {}  # the general path writes every row as received
            apply_upserts(changes, self.using, ApplyStats())
            return None
        if self.by_pk is not None:
            # MySQL: ON DUPLICATE KEY UPDATE matches any unique key, so a new row
            # holding another row's unique value would silently overwrite that row.
            # New rows are plain inserts (such a clash is an error, handled by
            # pull_page); rows here are matched by their primary key (sql.py).
            self.insert_sql.write(
                [row for row, pk in zip(rows, pks, strict=True) if pk is None], returning=False
            )
            self.by_pk.write(
                [[pk, *row] for row, pk in zip(rows, pks, strict=True) if pk is not None],
                returning=False,
            )
            written: list[Any] = []
            returning = False
        else:
            returning = want_pks and bool(self.insert_sql.returning)
            written = self.insert_sql.write(rows, returning=returning)
        if self.options.m2m_fields:
            self._write_m2m(changes)
        return written if returning else None

    def _write_m2m(self, changes: list[IncomingChange]) -> None:
        """Many-to-many links; a link to a row not written yet (a later page, a model
        pulled later) is left out for now and written by the second pass."""
        try:
            write_m2m(self.options, changes, self.using)
            return
        except ApplyError as exc:
            # apply checks every link of a field before writing any of it.
            if self.relinking or exc.field not in {m.name for m in self.options.m2m_fields}:
                raise
        kept = []
        for index, change in enumerate(changes):
            data = change.data
            for m2m in self.options.m2m_fields:
                rel = registry.get_options(m2m.related_model)
                if rel is None or not data[m2m.name]:
                    continue
                wanted = [normalize_key(rel, k) for k in data[m2m.name]]
                there = resolve_keys(rel, wanted, self.using)
                if len(there) < len(set(wanted)):
                    data = {**data, m2m.name: [list(k) for k in wanted if k in there]}
                    self.overrides.setdefault(index, {})[m2m.name] = data[m2m.name]
                    self.deferred = True
            if data is not change.data:
                change = IncomingChange(
                    change.seq, change.options, change.op, change.key, change.old_key, data,
                    change.raw,
                )  # fmt: skip
            kept.append(change)
        write_m2m(self.options, kept, self.using)

    def _values(self, changes: list[IncomingChange]) -> list[list[Any]] | None:
        options, connection = self.options, self.connection
        fks = self._fk_values(changes)
        if fks is None:
            return None
        out = []
        for index, change in enumerate(changes):
            data = change.data
            row = []
            for f, name, text in self.plain:
                raw = data[name]
                if text and (raw is None or type(raw) is str):
                    row.append(raw)
                    continue
                try:
                    row.append(f.get_db_prep_save(decode_value(f, raw), connection))
                except Exception as exc:
                    raise ApplyError(
                        f"bad value {raw!r} ({exc})", model=options.label, key=change.key,
                        field=name,
                    ) from exc  # fmt: skip
            for column in fks:
                row.append(column[index])
            row.extend(self.fixed)
            out.append(row)
        return out

    def _fk_values(self, changes: list[IncomingChange]) -> list[list[Any]] | None:
        """Per foreign key, the column's value for each change (one query per key); None
        when one cannot be resolved here (a bad key, or a row not written yet that a
        non-nullable key points at: apply's rounds, or its error)."""
        columns = []
        for fk, reader in self.fk_readers:
            if reader is None:
                return None
            keys: list[Key | None] = []
            for change in changes:
                raw = change.data[fk.name]
                try:
                    keys.append(None if raw is None else reader.key_from_wire(raw))
                except (ValueError, TypeError):
                    return None  # the general path names the bad key
            mapped = resolve_keys(reader.options, {k for k in keys if k is not None}, self.using)
            rel_pk = reader.options.model._meta.pk
            assert rel_pk is not None
            if fk.target_field.attname != rel_pk.attname:
                to_attr = dict(
                    reader.options.model._base_manager.using(self.using)
                    .filter(pk__in=list(mapped.values()))
                    .values_list("pk", fk.target_field.attname)
                )
                mapped = {k: to_attr[pk] for k, pk in mapped.items()}
            column: list[Any] = []
            prepare = not self.int_fk[fk]
            for index, key in enumerate(keys):
                if key is None:
                    column.append(None)
                    continue
                value = mapped.get(key)
                if value is None:
                    if fk.null and not self.relinking:
                        # A row not written yet (later in this page or a later one, or
                        # of a model pulled later): null for now, set by a second pass.
                        self.deferred = True
                        self.overrides.setdefault(index, {})[fk.name] = None
                        column.append(None)
                        continue
                    return None
                column.append(fk.get_db_prep_save(value, self.connection) if prepare else value)
            columns.append(column)
        return columns
