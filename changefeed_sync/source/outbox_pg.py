"""PostgreSQL: one save's row and its event in one statement.

A registered save would otherwise cost a statement more than an unregistered
one (the event's INSERT), and in autocommit three more (BEGIN, the event,
COMMIT). ``capture`` hands the row's INSERT or UPDATE, as Django compiled it,
to ``execute_with_event``, which sends instead::

    WITH "_cfs_row" AS (<the row statement> RETURNING ...),
         "_cfs_event" AS (INSERT INTO <outbox> ... SELECT ... FROM "_cfs_row")
    SELECT ... FROM "_cfs_row"

One statement is atomic: the row and its event are written together or not
at all (in autocommit, one statement is one transaction; inside ``atomic()``
it is part of the caller's). The event is inserted only if the row statement
wrote a row (an UPDATE may match none). The statement returns what the row
statement returned, or one row per row written, so Django reads it unchanged
(``fetchone`` after an INSERT, ``rowcount`` after an UPDATE).

Planning that statement costs about as much as running it, so each shape is
prepared once per connection (``PREPARE``, then ``EXECUTE`` with the values).
A prepared statement belongs to a server session, which a transaction-mode
connection pooler (PgBouncer) swaps under the client: where Django is told
about such a pooler (``DISABLE_SERVER_SIDE_CURSORS``) or binds parameters
server-side (psycopg then prepares by itself), nothing is prepared, and a
prepared statement found missing switches preparing off for that database
(``CHANGEFEED_SYNC_PREPARE_STATEMENTS`` decides explicitly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, models, transaction

from .. import conf
from ..models import Event
from ..outbox import Change

logger = logging.getLogger("changefeed_sync.capture")

# The event's columns, filled from two parameters (_event_params): its model, and
# one JSON document holding the four JSON columns. Adapting parameters and
# encoding JSON are most of what a save's event costs the client, so the
# document is encoded once and taken apart by the server; the time is the
# server's clock at the statement (as the row's own, should it use one).
_EVENT_FIELDS = ("created_at", "model", "op", "key", "old_key", "data", "changed")
_EVENT_VALUES = (
    "clock_timestamp(), %s, 'upsert', e.j->'k', NULLIF(e.j->'o', 'null'), e.j->'d', "
    "NULLIF(e.j->'c', 'null')"
)


@dataclass(frozen=True)
class _Statement:
    text: str  # with %s placeholders, sent as it is when not prepared
    name: str  # of the prepared statement: a digest of its text, the same in every session
    prepare: str  # PREPARE name AS ... with $n placeholders
    execute: str  # EXECUTE name(%s, ...)


Execute = Callable[[str, Any, bool, Any], Any]

# Returned by execute_with_event when it sent nothing.
DECLINED: Any = object()


def execute_with_event(
    execute: Execute,
    sql: str,
    params: Any,
    context: dict[str, Any],
    model: type[models.Model],
    change: Change,
) -> Any:
    """Send ``sql`` (a save's row statement) with ``change``'s event as one
    statement, through ``execute`` (an execute wrapper's), and return what it
    returns; ``DECLINED``, having sent nothing, for a statement of a shape
    this does not know (the caller then uses a transaction)."""
    connection = context["connection"]
    try:
        statement = _statements[sql]
    except KeyError:
        if len(_statements) >= 512:  # one entry per model and statement shape
            _statements.clear()
        statement = _statements[sql] = _statement(connection, sql, model)
    if statement is None:
        return DECLINED
    values = [*params, *_event_params(connection, change)]
    if _prepares(connection) and statement.name not in _unpreparable:
        prepared = _prepared_on(connection)
        if statement.name in prepared or _prepare(execute, statement, context):
            prepared.add(statement.name)
            try:
                return execute(statement.execute, values, False, context)
            except DatabaseError as exc:
                if not _gone(exc):
                    raise
                _stop_preparing(connection, exc)
                if connection.in_atomic_block:
                    # The failed statement aborted the caller's transaction: it
                    # fails this once; later saves are sent unprepared.
                    raise
                # In autocommit the failed statement changed nothing: send it unprepared.
    return execute(statement.text, values, False, context)


_statements: dict[str, _Statement | None] = {}


def _event_params(connection: Any, change: Change) -> list[Any]:
    document = {"k": change.key, "o": change.old_key, "d": change.data, "c": change.changed}
    return [change.label, json.dumps(document)]


def _statement(connection: Any, sql: str, model: type[models.Model]) -> _Statement | None:
    """The one statement for ``sql`` (a save of ``model``), or None when ``sql`` is
    of another shape."""
    row = row_statement(sql)
    if row is None:
        return None
    row_sql, returns = row
    qn = connection.ops.quote_name
    column = {f.name: f.column for f in Event._meta.concrete_fields}
    columns = ", ".join(qn(column[name]) for name in _EVENT_FIELDS)
    text = (
        f'WITH "_cfs_row" AS ({row_sql if returns else row_sql + " RETURNING 1"}), '
        f'"_cfs_event" AS (INSERT INTO {qn(Event._meta.db_table)} ({columns}) '
        f'SELECT {_EVENT_VALUES} FROM "_cfs_row", (SELECT %s::jsonb AS j) AS e) '
        f'SELECT {"*" if returns else "1"} FROM "_cfs_row"'
    )
    numbered, count = _numbered(text)
    # A prepared statement's parameter types are fixed when it is prepared: the
    # name covers the column types too, so that a statement prepared (on a
    # pooled session, say) before a migration changed a type is not taken for
    # the same statement after it.
    types = "|".join(
        str(f.db_type(connection)) for m in (model, Event) for f in m._meta.concrete_fields
    )
    name = "cfs_" + hashlib.sha256(f"{text}\n{types}".encode()).hexdigest()[:24]
    return _Statement(
        text=text,
        name=name,
        prepare=f"PREPARE {name} AS {numbered}",
        execute=f"EXECUTE {name}({', '.join(['%s'] * count)})",
    )


def _numbered(text: str) -> tuple[str, int]:
    """``%s`` placeholders -> ``$1``, ``$2``...; ``%%`` -> ``%``."""
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() == "%%":
            return "%"
        count += 1
        return f"${count}"

    return re.sub(r"%%|%s", number, text), count


# The WHERE of a save's UPDATE: the primary key, nothing else.
_PK_WHERE = re.compile(r'"[^"]+"\."[^"]+" = %s( RETURNING .*)?', re.DOTALL)

# Values that are what the instance holds: a parameter, cast or not (contrib.postgres'
# array and range fields compile to %s::type), or NULL (an UPDATE writes None as
# NULL). Anything else there, an expression a field's pre_save returned or DEFAULT,
# is a value only the database knows once it is written.
_VALUE = r"(?:%s(?:::\w[\w ]*(?:\(\d+(?:, ?\d+)?\))?(?:\[\d*\])*)?|NULL)"
_PARAMETERS = re.compile(f"{_VALUE}(?:, {_VALUE})*")
_ASSIGNMENTS = re.compile(f'"[^"]+" = {_VALUE}(?:, "[^"]+" = {_VALUE})*')


def _insert_parts(sql: str) -> tuple[str, str, str] | None:
    """``INSERT INTO t (a, b) VALUES (<values>)<tail>`` -> (``INSERT INTO t (a, b``,
    values, tail), for one row; None for another shape."""
    head, sep, rest = sql.partition(") VALUES (")
    if not sep or ") VALUES (" in rest:
        return None
    end = rest.rfind(") RETURNING ")
    if end >= 0:
        return head, rest[:end], rest[end + 1 :]
    if rest.endswith(")"):
        return head, rest[:-1], ""
    return None


def values_are_parameters(sql: str) -> bool:
    """Whether every value ``sql`` (a save's INSERT or UPDATE, as Django compiled
    it) writes is one the instance holds. A field's ``pre_save`` may return an
    expression, which Django compiles into the statement: then only the stored
    row tells the value (Django 6.0+ reads it back with RETURNING, older
    versions never do)."""
    if sql.startswith("INSERT INTO "):
        parts = _insert_parts(sql)
        return parts is not None and _PARAMETERS.fullmatch(parts[1]) is not None
    if sql.startswith("UPDATE "):
        _, sep, rest = sql.partition(" SET ")
        at = rest.rfind(" WHERE ")
        return bool(sep) and at >= 0 and _ASSIGNMENTS.fullmatch(rest[:at]) is not None
    return False


def row_statement(sql: str) -> tuple[str, bool] | None:
    """``sql``, and whether it has RETURNING, when it is a statement whose event
    follows from the instance: one row's INSERT, or an UPDATE of one row by
    primary key, writing only values the instance holds. Anything else
    (several rows, a WHERE beyond the primary key, a value that is not a
    parameter: DEFAULT, an expression) is None: the event is built from the
    instance, which does not know what the database made of those.
    """
    if not values_are_parameters(sql):
        return None
    if sql.startswith("INSERT INTO "):
        parts = _insert_parts(sql)
        return None if parts is None else (sql, bool(parts[2]))
    if sql.startswith("UPDATE "):
        at = sql.rfind(" WHERE ")
        match = _PK_WHERE.fullmatch(sql[at + len(" WHERE ") :]) if at >= 0 else None
        if match is None:
            return None
        return sql, match.group(1) is not None
    return None


# ------------------------------------------------------------ preparing


def _gone(exc: DatabaseError) -> bool:
    """Whether the prepared statement is not (or no longer) what was prepared:
    missing (another server session, DISCARD ALL, DEALLOCATE), or its result
    changed with the table."""
    state = _sqlstate(exc)
    return state == "26000" or (state == "0A000" and "must not change result type" in str(exc))


# Aliases where a prepared statement went missing: not prepared again in this process.
_not_preparing: set[str] = set()


def _prepares(connection: Any) -> bool:
    setting = conf.prepare_statements()
    if setting is not None:
        return setting
    if connection.alias in _not_preparing:
        return False
    settings = connection.settings_dict
    if settings.get("DISABLE_SERVER_SIDE_CURSORS"):
        return False  # Django was told a transaction-mode pooler is in between
    return not (settings.get("OPTIONS") or {}).get("server_side_binding")


def _prepared_on(connection: Any) -> set[str]:
    """Names prepared on the current server session of ``connection`` (a new
    session, after a reconnect, starts with none)."""
    raw = connection.connection
    held = getattr(connection, "_changefeed_prepared", None)
    if held is None or held[0] is not raw:
        held = (raw, set())
        connection._changefeed_prepared = held
    names: set[str] = held[1]
    return names


# Statements PostgreSQL would not prepare: sent unprepared from then on.
_unpreparable: set[str] = set()


def _prepare(execute: Execute, statement: _Statement, context: dict[str, Any]) -> bool:
    """PREPARE ``statement`` on the session; False if PostgreSQL refused it."""
    try:
        if context["connection"].in_atomic_block:
            # A refused PREPARE would abort the caller's transaction: in a
            # savepoint (once per statement shape and session).
            with transaction.atomic(using=context["connection"].alias):
                execute(statement.prepare, None, False, context)
        else:
            execute(statement.prepare, None, False, context)
    except DatabaseError as exc:
        state = _sqlstate(exc) or ""
        if state == "42P05":
            # Already there (a pooler handed over a session that has it): the
            # name is a digest of the text and the column types, so it is the
            # same statement.
            return True
        if not state.startswith("42"):
            raise  # not about the statement (a timeout, a lost connection): as any error
        # Not preparable (a parameter whose type cannot be inferred, say); the
        # statement itself may still run, unprepared, like any other.
        _unpreparable.add(statement.name)
        logger.warning("could not prepare %s (%s); sending it unprepared", statement.name, exc)
        return False
    return True


def _stop_preparing(connection: Any, exc: DatabaseError) -> None:
    _not_preparing.add(connection.alias)
    _prepared_on(connection).clear()
    logger.warning(
        "database %r: a prepared capture statement went missing (%s); sending saves "
        "unprepared from now on. Behind a transaction-mode pooler set "
        "DISABLE_SERVER_SIDE_CURSORS or CHANGEFEED_SYNC_PREPARE_STATEMENTS = False.",
        connection.alias,
        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
    )


def _sqlstate(exc: BaseException) -> str | None:
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
