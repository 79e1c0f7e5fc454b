"""Full Data Pull: make the target an exact copy of the source's registered rows.

All or nothing: the whole pull runs in one transaction on the target, so a
failure anywhere (source down, a row that cannot be applied, a killed
process) leaves the target as it was. Rows the source does not have are
deleted only after every page was read, and a pull that would delete more
than half of a model's rows stops unless explicitly allowed (an empty or
wrong source must not wipe the target). A dry run does all the work and
rolls it back, so its counts are exactly what a real pull would do.

Memory stays constant whatever the table size: pages are applied one at a
time (the next one is fetched while the current one is applied), and the
primary keys of the target rows the source has go into a temporary table
of the pull's transaction; the rows to delete are then found with an
anti-join, a chunk at a time. Files are staged on disk (files.py).

Speed: a page's rows are compared with the target's (snapshot.RowReader,
one query per page) and only new or changed rows are written, with one
multi-row upsert per chunk (one array per column on PostgreSQL). A
nullable foreign key to a row not written yet (a self-reference to a later
page, a cycle between models) is written null and set by a second pass
over those models once every row is there; so is a many-to-many link to such a row.

Unique values that are not the natural key: the target may hold, under another
natural key, a value an incoming row is to have (a unique field swapped between two
rows, a value freed by one row and taken by another, a natural key changed outside
the ORM: the old row still holds the other unique values when the new key arrives).
Upserts match on the natural key only, so such a row is a clash, not a match. A
page's write runs in a savepoint; when it fails on an IntegrityError, the rows here
that hold one of the page's values of a unique constraint other than the natural
key (unique fields, unique_together, UniqueConstraint without condition) under
another key are moved out of the way (the field set to NULL where it may be, else
to a value no row has: ``~<n>`` for text, the far end of an integer's range, a new
UUID), remembered, and the page is compared and written again. This is safe
because the source, unique on that constraint too, has no row with that value
under their keys: each such row is either written again by a later page (or
later in the same one) with the source's values, or deleted at the end as
missing; the pull checks that before it commits and fails naming model, natural
key and field otherwise (with keep-missing, a kept row holding a value the source
needs; or a source that changed while it was read). Why not delete missing rows
first: which rows are missing is known only after every page was read (and,
compared by digests, only in the buckets that differ), and a swap between two rows
the source has needs a move anyway. Only pages that clash pay for any of this: a
savepoint per page written is all the others cost.

MySQL/MariaDB: ``ON DUPLICATE KEY UPDATE`` matches any unique key, so a new row
holding another row's unique value would silently overwrite that row. There, new
rows are plain inserts (a clash is an IntegrityError, handled as above) and rows
already here are upserted by their primary key, which is checked before any other
unique key.

On a relay (a site with active targets of its own) the pull also writes, in
its transaction and page by page, an event per row it created, updated or
deleted, so that what it changed reaches the relay's targets through its feed.

A running pull records its runner (host:pid) and, from a second thread
with its own connection, a heartbeat and its progress. A pull whose runner
is gone (its pid is dead on this host, or its heartbeat stopped) is marked
failed with the reason the next time pulls are listed or started.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property, partial
from typing import Any

from django.db import DatabaseError, IntegrityError, connections, models, transaction
from django.db.models import Q
from django.utils import timezone

from . import conf, outbox, registry, sql
from .client import SourceClient, source_id_of
from .context import applying
from .exceptions import ApplyError, ChangefeedError, ProtocolError
from .files import Stage
from .keys import max_params, resolve_keys
from .models import DataPull, DataSource, Event
from .registry import Key, ModelOptions
from .serialization import chunked, decode_value, key_of_row, normalize_key
from .snapshot import (
    DIGEST_VERSION,
    MAX_BUCKETS,
    DigestPage,
    RowReader,
    _plain_text,
    collection_paused,
    encode_buckets,
)
from .target.apply import ApplyStats, apply_upserts, is_relay
from .target.changes import IncomingChange, parse
from .target.links import write_m2m

logger = logging.getLogger("changefeed_sync.pull")

MAX_DELETE_SHARE = 0.5
_DELETE_CHUNK = 500


class PullRefused(ChangefeedError):
    """The pull would delete too much; nothing was written."""


class _DryRun(Exception):
    pass


@dataclass(frozen=True)
class Progress:
    """Where a running pull is: ``done`` of about ``total`` rows of model ``label``."""

    label: str
    done: int
    total: int
    model: int  # 1-based index of the model
    models: int
    phase: str = "read"  # read | relink | delete | done
    note: str = ""

    def __str__(self) -> str:
        if self.phase == "done":
            return "done" + (f"; {self.note}" if self.note else "")
        head = f"[{self.model}/{self.models}] {self.label}: "
        if self.phase == "read":
            return head + f"{self.done:,} of {self.total:,} rows"
        if self.phase == "relink":
            return head + f"{self.done:,} of {self.total:,} rows again, for references read late"
        return head + f"deleted {self.done:,} rows the source does not have"


ProgressCallback = Callable[[Progress], None]


# ------------------------------------------------------------------ reading pages


def _pages(
    client: SourceClient,
    labels: list[str],
    limit: int,
    extra: dict[str, dict[str, Any]] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every snapshot page of every model, in order; the next request is already in
    flight while the caller applies the current page (the source works meanwhile).
    ``extra``: more query parameters per model (the buckets of a digest comparison);
    ``meanwhile`` is called while the first page is being fetched."""

    def fetch(label: str, after: str) -> dict[str, Any]:
        params = {"model": label, "after": after, "limit": limit, **(extra or {}).get(label, {})}
        body = client.get_json("snapshot/", params, timeout=120)
        if not isinstance(body.get("rows"), list):
            raise ProtocolError(f"snapshot page of {label} has no rows")
        return body

    if not labels:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="changefeed-pull-fetch")
    try:
        index, after = 0, ""
        pending: Future[dict[str, Any]] | None = pool.submit(fetch, labels[0], after)
        if meanwhile is not None:
            meanwhile()
        while pending is not None:
            body = pending.result()
            label = labels[index]
            if body.get("more"):
                next_after = str(body.get("next", ""))
                if next_after == after:
                    raise ProtocolError(f"snapshot of {label} does not move past {after!r}")
                after = next_after
                pending = pool.submit(fetch, label, after)
            elif index + 1 < len(labels):
                index, after = index + 1, ""
                pending = pool.submit(fetch, labels[index], after)
            else:
                pending = None
            yield label, body
    finally:
        # A failed pull does not wait for a request still in flight.
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ seen rows


class _Seen:
    """Primary keys of the target rows the source has, for one model: a temporary
    table of the pull's transaction (no per-row state in memory)."""

    def __init__(self, options: ModelOptions, using: str, index: int) -> None:
        self.options = options
        self.using = using
        connection = connections[using]
        self.vendor = connection.vendor
        qn = connection.ops.quote_name
        pk = options.model._meta.pk
        assert pk is not None
        self.pk_field = pk
        name = f"changefeed_pull_seen_{index}"
        if self.vendor == "postgresql":
            self.table = f"pg_temp.{qn(name)}"
        elif self.vendor == "sqlite":
            self.table = f"temp.{qn(name)}"
        else:
            self.table = qn(name)
        self.model_table = qn(options.model._meta.db_table)
        self.pk_column = qn(pk.column)
        self.scope_name = f"changefeed_pull_scope_{index}"
        self.scope = self.table.replace(name, self.scope_name)
        # With a scope (a digest comparison): only the rows in the scope table can be
        # missing; the others are known to be on the source.
        self.scoped = False
        self.scope_rows = 0
        self.drop()  # MySQL keeps temporary tables across a rolled back transaction
        self.column = pk.rel_db_type(connection)
        self._create(name)
        self.chunk = max(1, min(connection.features.max_query_params or 1000, 1000))

    def _create(self, name: str) -> None:
        connection = connections[self.using]
        qn = connection.ops.quote_name
        with connection.cursor() as cursor:
            if self.vendor == "postgresql":
                cursor.execute(
                    f"CREATE TEMPORARY TABLE {qn(name)} (pk {self.column} PRIMARY KEY) ON COMMIT DROP"
                )
            else:
                cursor.execute(f"CREATE TEMPORARY TABLE {qn(name)} (pk {self.column} PRIMARY KEY)")

    def limit_to(self, pks: list[Any]) -> None:
        """Add rows to the scope (the first call makes the deletes scoped)."""
        if not self.scoped:
            self._create(self.scope_name)
            self.scoped = True
        self._insert(self.scope, pks)
        self.scope_rows += len(pks)

    def add(self, pks: list[Any]) -> None:
        self._insert(self.table, pks)

    def _insert(self, table: str, pks: list[Any]) -> None:
        if not pks:
            return
        connection = connections[self.using]
        if isinstance(self.pk_field, models.IntegerField):  # auto fields: as read
            values = pks
        else:
            values = [self.pk_field.get_db_prep_value(pk, connection) for pk in pks]
        with connection.cursor() as cursor:
            if self.vendor == "postgresql":  # one array, not a parameter per key
                cursor.execute(
                    f"INSERT INTO {table} (pk) SELECT unnest(%s::{self.column}[])"
                    " ON CONFLICT DO NOTHING",
                    [values],
                )
                return
            if self.vendor == "sqlite":
                insert, suffix = f"INSERT OR IGNORE INTO {table} (pk) VALUES ", ""
            elif self.vendor == "mysql":
                insert, suffix = f"INSERT IGNORE INTO {table} (pk) VALUES ", ""
            else:
                insert, suffix = f"INSERT INTO {table} (pk) VALUES ", ""
            for chunk in chunked(values, self.chunk):
                cursor.execute(insert + ",".join(["(%s)"] * len(chunk)) + suffix, chunk)

    def _scalar(self, sql: str) -> int:
        with connections[self.using].cursor() as cursor:
            cursor.execute(sql)
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def _anti_join(self) -> str:
        scope = f"JOIN {self.scope} c ON c.pk = t.{self.pk_column} " if self.scoped else ""
        return (
            f"FROM {self.model_table} t {scope}LEFT JOIN {self.table} s "
            f"ON s.pk = t.{self.pk_column} WHERE s.pk IS NULL"
        )

    def total(self) -> int:
        return self._scalar(f"SELECT COUNT(*) FROM {self.model_table}")

    def missing_count(self) -> int:
        return self._scalar(f"SELECT COUNT(*) {self._anti_join()}")

    def missing(self) -> Iterator[list[Any]]:
        """Primary keys of rows the source does not have, a chunk at a time, by keyset."""
        connection = connections[self.using]
        last: Any = None
        while True:
            sql = f"SELECT t.{self.pk_column} {self._anti_join()}"
            params: list[Any] = []
            if last is not None:
                sql += f" AND t.{self.pk_column} > %s"
                params.append(last)
            sql += f" ORDER BY t.{self.pk_column} LIMIT {_DELETE_CHUNK}"
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                raw = [row[0] for row in cursor.fetchall()]
            if not raw:
                return
            last = raw[-1]
            yield [self.pk_field.to_python(value) for value in raw]

    def drop(self) -> None:
        connection = connections[self.using]
        temporary = "TEMPORARY " if self.vendor == "mysql" else ""
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP {temporary}TABLE IF EXISTS {self.table}")
                cursor.execute(f"DROP {temporary}TABLE IF EXISTS {self.scope}")
        except DatabaseError:  # the transaction is broken; its rollback drops it
            pass


# ------------------------------------------------------------------ one model


class _Model:
    """What a pull needs per model, worked out once: the temporary table of rows seen,
    and, when the model allows it, a one-query read of the target's current rows and
    a raw multi-row upsert. Anything unusual (many-to-many fields, a foreign key to an
    unregistered model, a non-auto primary key, auto_now fields, inheritance, no unique
    constraint on the natural key) goes through apply.py's general path instead."""

    def __init__(self, options: ModelOptions, using: str, index: int, relay: bool) -> None:
        self.options = options
        self.using = using
        # This site is a source for others too: what the pull writes goes into its outbox.
        self.relay = relay
        self.seen = _Seen(options, using, index)
        self.connection = connections[using]
        self.reader = RowReader(options, using)
        self.fk_readers = [
            (fk, RowReader(rel, using) if rel is not None else None) for fk, rel in self.reader.fks
        ]
        self.plain = [(f, f.name, _plain_text(f)) for f in options.plain_fields]
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
        # Rows moved out of the way of an incoming row's unique value (make_room):
        # natural key -> (pk, field, natural key of the row that needed the value).
        self.moved: dict[Key, tuple[Any, str, Key | None]] = {}
        self._placeholders = 0

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

    # ------------------------------------------------------------ making room

    @cached_property
    def other_unique(self) -> list[tuple[tuple[Any, ...], bool]]:
        """The unique constraints that are not the natural key's, as (fields, whether
        NULL values are distinct); only those whose every field is synced (the
        incoming rows carry their values) and that have no condition."""
        meta = self.options.model._meta
        heads = set(self.options.key_heads)
        synced = self.options.field_names
        groups: list[tuple[tuple[str, ...], bool]] = [
            ((f.name,), True) for f in meta.concrete_fields if f.unique and not f.primary_key
        ]
        groups.extend((tuple(g), True) for g in meta.unique_together)
        for constraint in meta.total_unique_constraints:
            distinct = getattr(constraint, "nulls_distinct", None) is not False
            groups.append((tuple(constraint.fields), distinct))
        out = []
        for names, distinct in groups:
            if set(names) == heads or not set(names) <= synced:
                continue
            out.append((tuple(meta.get_field(name) for name in names), distinct))
        return out

    def _incoming(self, f: Any, changes: list[IncomingChange]) -> list[Any]:
        """Each change's value of field ``f`` as this site will hold it (a foreign key:
        the related row's primary key here; None where it cannot be told yet)."""
        raws = [change.data[f.name] for change in changes]
        if not f.is_relation:
            return [None if raw is None else decode_value(f, raw) for raw in raws]
        rel = registry.get_options(f.related_model)
        if rel is None:
            return [None] * len(changes)
        keys = [None if raw is None else normalize_key(rel, raw) for raw in raws]
        mapped = resolve_keys(rel, {k for k in keys if k is not None}, self.using)
        return [None if k is None else mapped.get(k) for k in keys]

    def make_room(self, changes: list[IncomingChange]) -> int:
        """Move out of the way the rows here that hold, under another natural key, a
        unique value (not the natural key) that one of ``changes`` is to have; return
        how many were moved. The source has no row with that value under their keys,
        so each of them is either written again by a later page of this pull or
        deleted as missing; the pull checks that at its end (``check_moved``)."""
        options = self.options
        manager = options.model._base_manager.using(self.using)
        moved = 0
        for group, nulls_distinct in self.other_unique:
            columns = [self._incoming(f, changes) for f in group]
            wanted: dict[tuple[Any, ...], Key] = {}
            own: dict[Key, tuple[Any, ...]] = {}
            for change, values in zip(changes, zip(*columns), strict=True):
                own[change.key] = values
                if nulls_distinct and any(v is None for v in values):
                    continue  # NULL clashes with nothing
                wanted[values] = change.key
            if not wanted:
                continue
            lookups = [f.attname if not f.is_relation else f"{f.name}__pk" for f in group]
            holders = []
            for chunk in chunked(list(wanted), max(1, max_params(self.using) // len(group))):
                condition = Q()
                for values in chunk:
                    condition |= Q(**dict(zip(lookups, values, strict=True)))
                holders.extend(
                    manager.filter(condition).values_list("pk", *lookups, *options.lookups)
                )
            for row in holders:
                pk, values = row[0], tuple(row[1 : 1 + len(group)])
                key = key_of_row(options, row[1 + len(group) :])
                if own.get(key) == values:
                    continue  # the row that is to have this value
                needed_by = wanted.get(values)
                self._move(pk, key, group, nulls_distinct, set(wanted), needed_by)
                moved += 1
        return moved

    def _move(
        self,
        pk: Any,
        key: Key,
        group: tuple[Any, ...],
        nulls_distinct: bool,
        taken: set[tuple[Any, ...]],
        needed_by: Key | None,
    ) -> None:
        """Give the row ``pk`` a value of one field of ``group`` that clashes with
        nothing: NULL where the field allows it, else a value not used here."""
        label = self.options.label
        field = next((f for f in group if f.null and nulls_distinct), None)
        value: Any = None
        if field is None:
            for f in group:
                index = group.index(f)
                value = self._free_value(f, {values[index] for values in taken})
                if value is not None:
                    field = f
                    break
        if field is None:
            whose = f" (the source's row {list(needed_by)!r} has it)" if needed_by else ""
            raise ApplyError(
                f"a row here holds a unique value the source's row needs{whose}, and no "
                "value can be put in its place to make room (the field is neither nullable "
                "nor text, integer or UUID)",
                model=label, key=key, field=group[0].name,
            )  # fmt: skip
        connection = self.connection
        qn = connection.ops.quote_name
        meta = self.options.model._meta
        assert meta.pk is not None
        try:
            with transaction.atomic(using=self.using), connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {qn(meta.db_table)} SET {qn(field.column)} = %s "
                    f"WHERE {qn(meta.pk.column)} = %s",
                    [field.get_db_prep_save(value, connection), pk],
                )
        except DatabaseError as exc:
            raise ApplyError(
                f"a row here holds a unique value the source's row needs, and moving it "
                f"out of the way failed ({exc})",
                model=label, key=key, field=field.name,
            ) from exc  # fmt: skip
        first = self.moved.get(key)
        self.moved[key] = (pk, first[1] if first else field.name, needed_by)

    def _free_value(self, f: Any, taken: set[Any]) -> Any:
        """A value of ``f`` that no row here has and no incoming row wants, or None
        when no such value can be made for its type."""
        manager = self.options.model._base_manager.using(self.using)
        for attempt in range(64):
            n = self._placeholders
            self._placeholders += 64
            candidates: list[Any]
            if isinstance(f, models.UUIDField):
                candidates = [uuid.uuid4() for _ in range(8)]
            elif isinstance(f, models.CharField | models.TextField):
                room = f.max_length or 32
                if room < 2:  # a few symbols, checked once
                    candidates = list("~!#$%&*+-=?@^_|") if not attempt else []
                else:
                    candidates = [
                        text for i in range(n, n + 64) if len(text := f"~{i:x}") <= room
                    ]
            elif isinstance(f, models.IntegerField) and not f.is_relation:
                try:
                    low, high = self.connection.ops.integer_field_range(f.get_internal_type())
                except KeyError:
                    return None
                if low is not None and low < 0:
                    candidates = list(range(low + n, low + n + 64))
                elif high is not None:
                    candidates = list(range(high - n, high - n - 64, -1))
                else:
                    return None
            else:
                return None
            free = [c for c in candidates if c not in taken]
            if not free:
                if not candidates:
                    return None  # none of this length is left
                continue
            used = set(
                manager.filter(**{f"{f.attname}__in": free}).values_list(f.attname, flat=True)
            )
            value = next((c for c in free if c not in used), None)
            if value is not None:
                return value
        return None

    def check_moved(self, keep_missing: bool) -> None:
        """Every row moved out of the way must have been written again or deleted."""
        if not self.moved:
            return
        by_pk = {pk: (key, field, needed_by) for key, (pk, field, needed_by) in self.moved.items()}
        left = self.options.model._base_manager.using(self.using).filter(pk__in=list(by_pk))
        for pk in left.order_by("pk").values_list("pk", flat=True):
            key, field, needed_by = by_pk[pk]
            whose = f"the source's row {list(needed_by)!r}" if needed_by else "another row"
            if keep_missing:
                why = (
                    f"the source does not have this row and keep-missing keeps it, but its "
                    f"value is {whose}'s: the target cannot equal the source; pull without "
                    "keep-missing, or delete the row here"
                )
            else:
                why = (
                    f"this row held the value {whose} has and the source's copy of it "
                    "did not arrive after that (did the source change during the pull?)"
                )
            raise ApplyError(why, model=self.options.label, key=key, field=field)

    # ------------------------------------------------------------ writing

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
        if rows is None:  # a foreign key to a row not written yet: rounds, in apply.py
            self.overrides = {}  # the general path writes every row as received
            apply_upserts(changes, self.using, ApplyStats())
            return None
        if self.by_pk is not None:
            # MySQL: ON DUPLICATE KEY UPDATE matches any unique key, so a new row
            # holding another row's unique value would silently overwrite that row.
            # New rows are plain inserts (such a clash is an error, handled by
            # _pull_page); rows here are matched by their primary key (sql.py).
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
            # apply.py checks every link of a field before writing any of it.
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
        non-nullable key points at: apply.py's rounds, or its error)."""
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


class _Lost(Exception):
    """A row written by the general path is not there after its write."""

    def __init__(self, key: Key) -> None:
        super().__init__(key)
        self.key = key


# Tries of one page's write, each after moving aside the rows in its way.
_WRITE_TRIES = 8


def _pull_page(
    model: _Model,
    rows: list[dict[str, Any]],
    counts: dict[str, int],
    stage: Stage | None,
) -> None:
    """Upsert one page of one model; record the target pks of its rows as seen.

    The write runs in a savepoint: when it clashes with rows here on a unique
    constraint that is not the natural key, those rows are moved out of the way
    (``_Model.make_room``) and the page is compared and written again."""
    options = model.options
    label = options.label
    keys = []
    key_from_wire = model.reader.key_from_wire
    for row in rows:
        try:
            keys.append(key_from_wire(row["key"]))
        except Exception as exc:
            raise ApplyError(f"bad natural key ({exc})", model=label, key=row.get("key")) from exc
    fields = options.field_names
    track = not (model.was_empty or model.relinking)  # the pks of the rows written
    for attempt in range(_WRITE_TRIES):
        # A table empty at the start has none of the keys, unless a try failed.
        fresh = model.was_empty and not model.relinking and not attempt
        current = {} if fresh else model.reader.by_keys(keys)
        tally = {"created": 0, "updated": 0, "unchanged": 0}
        changes = []
        pks: list[Any] = []
        created = []
        seen = []
        for key, row in zip(keys, rows, strict=True):
            data = row["data"]
            found = current.get(key)
            if found is not None:
                seen.append(found[0])
                if found[1] == data:
                    tally["unchanged"] += 1
                    continue
                tally["updated"] += 1
                pks.append(found[0])
            else:
                tally["created"] += 1
                created.append(key)
                pks.append(None)
            if not isinstance(data, dict) or data.keys() != fields:
                # Same validation and errors as feed events (unknown or missing fields).
                parse({"seq": 0, "model": label, "op": "upsert", "key": list(key), "data": data})
            changes.append(IncomingChange(0, options, Event.UPSERT, key, None, data, row))
        if not changes:
            break
        try:
            with transaction.atomic(using=model.using):
                written = model.write(changes, pks, want_pks=track)
                if track and written is not None:
                    seen.extend(written)
                elif track and created:
                    there = resolve_keys(options, created, model.using)
                    if len(there) < len(created):
                        # MySQL's general path: a clash on another unique key updated
                        # the other row instead. Undone with the savepoint.
                        raise _Lost(next(k for k in created if k not in there))
                    seen.extend(there.values())
        except (IntegrityError, _Lost) as exc:
            if attempt + 1 < _WRITE_TRIES and model.make_room(changes):
                continue
            if isinstance(exc, _Lost):
                raise ApplyError(
                    "row is not on the target after its write", model=label, key=exc.key
                ) from None
            raise
        break
    for name, n in tally.items():
        counts[name] += n
    if model.moved:
        for key in keys:  # written again now (or equal to the source's row)
            model.moved.pop(key, None)
    if changes and model.relay:
        _relay_upserts(model, changes)
    if not model.relinking:
        model.seen.add(seen)
    if stage is not None and options.file_fields:
        stage.check(options, rows, counts)


def _relay_upserts(model: _Model, changes: list[IncomingChange]) -> None:
    """A relay's events for the rows one write of the pull created or updated, with
    their key and data as received. A foreign key written null for now (its row comes
    later) is null in the event too (a many-to-many link left out is left out), as it is in the row: a target of this site then
    never meets a key to a row it does not have yet, even in a cycle; the second pass
    that sets it writes the row again, and its event carries the final data."""
    label = model.options.label
    overrides = model.overrides
    events = []
    for index, change in enumerate(changes):
        data = change.raw["data"]
        if index in overrides:
            data = {**data, **overrides[index]}
        events.append(outbox.make_event(label, Event.UPSERT, change.raw["key"], data=data))
    outbox.write(model.using, events, locked=True)


def _delete_missing(
    model: _Model, using: str, counts: dict[str, int], allow: bool, report: Callable[[int], None]
) -> None:
    if model.was_empty:
        return  # every row it has now was written by this pull
    seen = model.seen
    if seen.scoped and not seen.scope_rows:
        return  # a digest comparison found every row the target has on the source
    label = seen.options.label
    missing = seen.missing_count()
    if not missing:
        return
    total = seen.total()
    if not allow and total and missing > MAX_DELETE_SHARE * total:
        raise PullRefused(
            f"the pull would delete {missing} of {total} rows of {label} "
            f"(more than {MAX_DELETE_SHARE:.0%}); if the source really is that empty, pull again "
            "with --allow-mass-delete (or the admin option), or use --keep-missing"
        )
    options = seen.options
    manager = options.model._base_manager.using(using)
    deleted = 0
    # Through the ORM, a chunk at a time: cascades and delete signals apply,
    # and no statement carries more than a chunk of ids.
    for chunk in seen.missing():
        if model.relay:
            # Targets delete by natural key: read the rows' keys while they are there.
            keys = manager.filter(pk__in=chunk).values_list(*options.lookups)
            outbox.write(
                using,
                [outbox.make_event(label, Event.DELETE, key_of_row(options, k)) for k in keys],
                locked=True,
            )
        manager.filter(pk__in=chunk).delete()
        deleted += len(chunk)
        report(deleted)
    counts["deleted"] += deleted


# ------------------------------------------------------------------ digests

ROWS_PER_BUCKET = 8
# Rows per digest request, as a multiple of the page size (digests are small; the
# source also answers after snapshot.DIGEST_SECONDS).
_DIGEST_PAGES = 100


def _source_digests(client: SourceClient, label: str, buckets: int, limit: int) -> DigestPage:
    """The source's bucket digests of every row of ``label``, summed over its pages."""
    total = DigestPage(buckets)
    after = ""
    while True:
        body = client.get_json(
            "snapshot/",
            {"model": label, "after": after, "limit": limit, "digest": buckets},
            timeout=120,
        )
        try:
            if body.get("buckets") != buckets:
                raise ValueError(f"asked for {buckets} buckets, got {body.get('buckets')!r}")
            total.merge(body["digests"])
            more, next_after = bool(body["more"]), str(body["next"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"snapshot digests of {label}: malformed page ({exc})") from exc
        if not more:
            return total
        if next_after == after:
            raise ProtocolError(f"snapshot digests of {label} do not move past {after!r}")
        after = next_after


class _SourceDigests:
    """The source's digests of the models compared by digests, asked for in order by
    two threads from the start of the pull (a small model's answer does not wait for a
    big one's): the source computes them while this site computes its own and applies
    the other models."""

    def __init__(self, client: SourceClient, buckets: dict[str, int]) -> None:
        self.buckets = buckets
        self.pool: ThreadPoolExecutor | None = None
        self.futures: dict[str, Future[DigestPage]] = {}
        if buckets:
            limit = _DIGEST_PAGES * conf.pull_page_size()
            self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="changefeed-digests")
            for label, n in buckets.items():
                self.futures[label] = self.pool.submit(_source_digests, client, label, n, limit)

    def close(self) -> None:
        if self.pool is not None:
            # A failed pull does not wait for a request still in flight.
            self.pool.shutdown(wait=False, cancel_futures=True)


def _digest_buckets(model: _Model, source_rows: int) -> int | None:
    """How many buckets to compare the model's rows in; None when every row is to be
    pulled (the table here is empty or holds less than a quarter of the source's
    rows, or the model has files: their contents are checked row by row)."""
    if model.was_empty or model.options.file_fields:
        return None
    target_rows = model.seen.total()
    if target_rows * 4 < source_rows:
        return None
    return min(MAX_BUCKETS, max(1, -(-max(source_rows, target_rows) // ROWS_PER_BUCKET)))


def _compare_digests(
    model: _Model, buckets: int, theirs: Future[DigestPage], counts: dict[str, int]
) -> int | None:
    """Compare the model's rows here with the source's digests (this site's computed
    now, after the models before it were applied); set ``model.only`` to the buckets
    that differ and count the rows of the others as unchanged. Return those rows'
    number, or None when too many buckets differ: then every row is pulled."""
    with collection_paused():
        mine = model.reader.digest_all(buckets)
    source = theirs.result()
    differ = source.differing(mine)
    if len(differ) * 4 > buckets:
        return None  # asking for a quarter of the buckets costs about all the rows
    unchanged = sum(source.counts) - sum(source.counts[b] for b in differ)
    counts["unchanged"] += unchanged
    model.seen.limit_to([])  # nothing can be missing but rows of the buckets that differ
    if differ:
        model.differ = (buckets, frozenset(differ))
        model.only = {"buckets": buckets, "only": encode_buckets(differ, buckets)}
    return unchanged


def _scope_deletes(model: _Model) -> None:
    """Put this site's rows of the buckets that differ in the deletes' scope: the only
    rows that can be missing on the source."""
    buckets, wanted = model.differ
    with collection_paused():
        for pks in model.reader.pks_in_buckets(buckets, wanted):
            model.seen.limit_to(pks)


# ------------------------------------------------------------------ the pull


def _new_counts() -> dict[str, int]:
    return {"created": 0, "updated": 0, "deleted": 0, "unchanged": 0}


def _delete_reporter(
    report: ProgressCallback, label: str, model: int, models: int
) -> Callable[[int], None]:
    return lambda deleted: report(Progress(label, deleted, deleted, model, models, "delete"))


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
    report = progress or (lambda p: None)
    start = client.get_json("snapshot/", {}, timeout=60)
    try:
        position = int(start["position"])
        # Sources that answer digest requests say so (older ones do not: full rows).
        digests = start.get("digests") == DIGEST_VERSION
        labels = [str(label) for label in start["models"]]
        totals = {str(k): int(v) for k, v in (start.get("counts") or {}).items()}
        # The source's identity: the checkpoint set below belongs to it (an older
        # source sends none, and the recorded one is cleared).
        source_id = source_id_of(start, f"source {source.name}: malformed snapshot start")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"source {source.name}: malformed snapshot start ({exc})") from exc
    all_options = []
    for label in labels:
        options = registry.options_for_label(label)
        if options is None:
            raise ApplyError(
                "model is not registered with changefeed_sync on this site", model=label
            )
        all_options.append(options)
    counts: dict[str, dict[str, int]] = {label: _new_counts() for label in labels}
    n = len(labels)
    index = {label: i + 1 for i, label in enumerate(labels)}
    stage = Stage(client, dry_run=dry_run) if any(o.file_fields for o in all_options) else None
    seen: dict[str, _Seen] = {}
    source_digests = _SourceDigests(client, {})
    try:
        with transaction.atomic(using=using), applying():
            # A relay passes on what the pull writes (chained replication), in this
            # transaction (SQLite: its write lock taken up front). A dry run passes
            # nothing on.
            relay = not dry_run and is_relay(using)
            if relay:
                outbox.lock(using)
            pullers = {}
            for i, options in enumerate(all_options):
                pullers[options.label] = _Model(options, using, i, relay)
                seen[options.label] = pullers[options.label].seen
            done = dict.fromkeys(labels, 0)
            if digests:
                # Models with rows here: compare digests, then pull only what differs.
                plan = {}
                for label in labels:
                    buckets = _digest_buckets(pullers[label], totals.get(label, 0))
                    if buckets is not None:
                        plan[label] = buckets
                source_digests = _SourceDigests(client, plan)
            for label in labels:
                model = pullers[label]
                if label in source_digests.futures:
                    unchanged = _compare_digests(model, source_digests.buckets[label],
                                                 source_digests.futures[label],
                                                 counts[label])  # fmt: skip
                    if unchanged is not None:
                        done[label] = unchanged
                        report(Progress(label, unchanged, max(totals.get(label, 0), unchanged),
                                        index[label], n))  # fmt: skip
                        if model.only is None:
                            continue  # nothing differs
                extra = meanwhile = None
                if model.only is not None:
                    extra = {label: model.only}
                    meanwhile = partial(_scope_deletes, model)  # while the source reads
                for _, body in _pages(client, [label], conf.pull_page_size(), extra, meanwhile):
                    with collection_paused():
                        _pull_page(model, body["rows"], counts[label], stage)
                    done[label] += len(body["rows"])
                    report(Progress(label, done[label], max(totals.get(label, 0), done[label]),
                                    index[label], n))  # fmt: skip
            # Second pass over the models whose rows pointed at rows read later
            # (self-references, cycles): every row is there now.
            relink = [label for label in labels if pullers[label].deferred]
            for label in relink:
                pullers[label].relinking = True
            done = dict.fromkeys(relink, 0)
            relink_extra = {
                label: only for label in relink if (only := pullers[label].only) is not None
            }
            for label, body in _pages(client, relink, conf.pull_page_size(), relink_extra):
                with collection_paused():
                    _pull_page(pullers[label], body["rows"], _new_counts(), None)
                done[label] += len(body["rows"])
                report(Progress(label, done[label], max(totals.get(label, 0), done[label]),
                                index[label], n, "relink"))  # fmt: skip
            if not keep_missing:
                for label in reversed(labels):
                    _delete_missing(
                        pullers[label],
                        using,
                        counts[label],
                        allow_mass_delete,
                        _delete_reporter(report, label, index[label], n),
                    )
            # Rows moved out of the way of another row's unique value: each must have
            # been written again or deleted by now, or the target is not the source.
            for label in labels:
                pullers[label].check_moved(keep_missing)
            for s in seen.values():
                s.drop()
            if dry_run:
                raise _DryRun
            DataSource.objects.using(using).filter(pk=source.pk).update(
                checkpoint=position,
                source_id=source_id or "",
                last_sync_at=timezone.now(),
                last_error="",
            )
            source.checkpoint = position
            source.source_id = source_id or ""
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
        source_digests.close()
        for s in seen.values():
            s.drop()
        if stage is not None:
            stage.cleanup()
    note = ""
    if stage is not None and stage.missing_examples:
        missing = sum(c.get("files_missing", 0) for c in counts.values())
        note = f"{missing} files missing on the source, e.g. " + ", ".join(
            stage.missing_examples[:3]
        )
    report(Progress("", 0, 0, n, n, "done", note))
    return position, counts


# ------------------------------------------------------------------ runs and runners


def this_runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_state(runner: str) -> bool | None:
    """Whether the runner's process is alive: None when it cannot be told from here
    (another host, or not a POSIX system)."""
    host, _, pid_text = runner.rpartition(":")
    if host != socket.gethostname() or os.name != "posix" or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            if fh.read().rpartition(")")[2].split()[:1] == ["Z"]:
                return False
    except OSError:
        pass
    return True


def stale_reason(pull: DataPull, *, vendor: str, now: datetime | None = None) -> str:
    """Why a running pull is dead ("" if it is not, as far as can be told)."""
    now = now or timezone.now()
    last = pull.heartbeat_at or pull.started_at or pull.created_at
    runner = pull.runner or "unknown"
    alive = _pid_state(pull.runner)
    if alive is False:
        return f"runner {runner} stopped responding at {last.isoformat()} (its process is gone)"
    if alive and vendor == "sqlite":
        # The pull's transaction holds SQLite's write lock, so no heartbeat can be
        # written while it runs: a live process is all there is to go by.
        return ""
    if now - last > timedelta(seconds=conf.pull_stale_after()):
        return f"runner {runner} stopped responding at {last.isoformat()}"
    return ""


def fail_stale_pulls(using: str = "default") -> list[int]:
    """Mark running pulls whose runner is gone as failed; return their ids."""
    vendor = connections[using].vendor
    now = timezone.now()
    failed = []
    for pull in DataPull.objects.using(using).filter(status=DataPull.RUNNING):
        reason = stale_reason(pull, vendor=vendor, now=now)
        if not reason:
            continue
        # Only if nothing moved since it was read (the runner may just have beaten).
        marked = (
            DataPull.objects.using(using)
            .filter(pk=pull.pk, status=DataPull.RUNNING, heartbeat_at=pull.heartbeat_at)
            .update(status=DataPull.FAILED, finished_at=now, error=reason)
        )
        if marked:
            logger.warning("pull %s from %s: %s", pull.pk, pull.source_id, reason)
            failed.append(pull.pk)
    return failed


class _Heartbeat:
    """Writes a running pull's heartbeat and latest progress from its own thread and
    connection: the pull's own connection is inside its transaction, where nobody
    else would see them (and a failure would roll them back)."""

    def __init__(self, pull_pk: int, using: str) -> None:
        self.pull_pk = pull_pk
        self.using = using
        self.message = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # SQLite: the pull holds the only write lock, a heartbeat could not be written.
        if connections[using].vendor != "sqlite":
            self._thread = threading.Thread(
                target=self._run, name=f"changefeed-pull-{pull_pk}-heartbeat", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        interval = min(2.0, conf.pull_stale_after() / 4)
        written: str | None = None
        try:
            while not self._stop.wait(interval):
                message = self.message
                try:
                    DataPull.objects.using(self.using).filter(
                        pk=self.pull_pk, status=DataPull.RUNNING
                    ).update(
                        heartbeat_at=timezone.now(),
                        **({"progress": message[:200]} if message != written else {}),
                    )
                    written = message
                except DatabaseError:
                    logger.warning("pull %s: could not write its heartbeat", self.pull_pk)
        finally:
            connections[self.using].close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def execute(
    pull: DataPull, *, using: str | None = None, progress: ProgressCallback | None = None
) -> DataPull:
    """Run a DataPull row and record its outcome (outside the pull's transaction)."""
    using = using or pull._state.db or "default"
    fail_stale_pulls(using)
    rows = DataPull.objects.using(using).filter(pk=pull.pk)
    busy = (
        DataPull.objects.using(using)
        .filter(source_id=pull.source_id, status=DataPull.RUNNING)
        .exclude(pk=pull.pk)
        .first()
    )
    if busy is not None:
        rows.update(
            status=DataPull.FAILED,
            finished_at=timezone.now(),
            error=f"pull #{busy.pk} of the same source is still running (runner {busy.runner}); "
            "run this one again when it has finished",
        )
        pull.refresh_from_db(using=using)
        return pull
    now = timezone.now()
    rows.update(
        status=DataPull.RUNNING,
        started_at=now,
        heartbeat_at=now,
        runner=this_runner(),
        progress="starting",
        error="",
    )
    heartbeat = _Heartbeat(pull.pk, using)
    last = ["done"]

    def report(p: Progress) -> None:
        heartbeat.message = last[0] = str(p)
        if progress is not None:
            progress(p)

    try:
        position, counts = run_pull(
            pull.source,
            using=using,
            dry_run=pull.dry_run,
            keep_missing=pull.keep_missing,
            allow_mass_delete=pull.allow_mass_delete,
            progress=report,
        )
    except BaseException as exc:
        heartbeat.stop()
        if isinstance(exc, Exception):
            logger.exception("pull %s from %s failed", pull.pk, pull.source)
        error = str(exc) or type(exc).__name__
        rows.update(status=DataPull.FAILED, finished_at=timezone.now(), error=error[:5000])
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: recorded, and still stop
    else:
        heartbeat.stop()
        done = last[0]
        rows.update(
            status=DataPull.SUCCEEDED,
            finished_at=timezone.now(),
            counts=counts,
            position=position,
            error="",
            progress=(f"preview, nothing written: {done}" if pull.dry_run else done)[:200],
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
