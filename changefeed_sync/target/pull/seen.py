"""The target rows a pull found on the source, per model: what is left is missing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db import DatabaseError, connections, models

from ...registry import ModelOptions
from ...serialization import chunked

# Primary keys of missing rows read, and deleted, a statement at a time.
_DELETE_CHUNK = 500


class Seen:
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
