"""Writing events: in the writer's transaction, as it changes rows.

Writers only INSERT, and never wait for each other on the outbox: an event's
``id`` is its insertion order, and it gets its feed position after its
transaction committed (``source/sequencer.py``, which also explains why). On
SQLite, which admits one writer at a time anyway, ``lock`` takes the write lock
early (see there). This is the core's part of the outbox: capture writes here,
and so does a target that relays what it applies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from django.db import connections, transaction
from django.utils import timezone

from .models import Event, OutboxState
from .signals import send_events_committed


def lock(using: str) -> None:
    """SQLite: take the database's write lock now, for the current transaction.

    SQLite already admits one writer at a time, but a transaction that reads
    first and writes later fails at once ("database is locked") if another
    writer got in between. Writing first takes the write lock up front, waiting
    for it like any plain write would. A write that matches no row takes the
    lock without dirtying a page (which would cost a journal write at commit).
    Other databases lock rows, not the database: nothing to do.
    """
    connection = connections[using]
    if connection.vendor != "sqlite":
        return
    if not connection.in_atomic_block:
        raise RuntimeError("changefeed_sync: the write lock needs a transaction (atomic block)")
    if getattr(connection, "transaction_mode", None) == "IMMEDIATE":
        return  # BEGIN IMMEDIATE took the write lock already (the W001 setting)
    table = connection.ops.quote_name(OutboxState._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} WHERE id = -1")


def write(using: str, events: Iterable[NewEvent], *, locked: bool = False) -> None:
    """Insert events in the caller's transaction and wake long-polls after commit.

    ``locked``: the caller already took ``lock()`` in this transaction (SQLite:
    one statement less per save).
    """
    batch = list(events)
    if not batch:
        return
    connection = connections[using]
    if connection.vendor == "mysql" and connection.in_atomic_block:
        _insert_at_commit(connection, using, batch)
        return
    with transaction.atomic(using=using, savepoint=False):
        if not locked:
            lock(using)
        _insert(using, batch)
        after_this_transaction(using)


class _AtCommit:
    """Events of a transaction on MySQL/MariaDB, inserted when it commits.

    There every statement is a round trip, and no statement writes a row and an
    event together (PostgreSQL's ``outbox_pg``): inserting each save's event at
    once cost a registered save twice an unregistered one. Kept in Django's own
    list of on-commit callbacks, so a rolled-back savepoint drops its events as
    Django drops its callbacks; called after the commit, it wakes readers.
    They are inserted just before the commit, or earlier, before any statement
    of the same connection that reads the outbox (so a transaction, and a test
    wrapped in one, sees its own events). Their ids are drawn then, after the
    transaction's reads and locks (read_locks), which keeps them in an order the
    events agree with.
    """

    __slots__ = ("using", "events", "wake")

    def __init__(self, using: str, events: list[NewEvent], wake: list[bool]) -> None:
        self.using = using
        self.events = events
        # Shared by the transaction's callbacks: the first one run wakes readers,
        # once for the whole commit (the signal is "look again", not a count).
        self.wake = wake

    def __call__(self) -> None:
        if not self.wake[0]:
            self.wake[0] = True
            after_commit(self.using)


class _Pending:
    """Inserts a connection's pending events before its commit and before any
    statement that reads the outbox (one per connection object)."""

    def __init__(self, connection: Any, using: str) -> None:
        self.connection = connection
        self.using = using
        self.count = 0  # events deferred since the last insert (savepoints may drop some)
        self.wake = [True]  # the current transaction's wake-up flag, see _AtCommit
        self.table = Event._meta.db_table
        self.commit = connection.commit
        connection.commit = self.commit_with_events
        # First in the list: Django's execute_wrapper() pops the last one on exit.
        connection.execute_wrappers.insert(0, self)

    def insert(self) -> None:
        self.count = 0
        pending = [f for _, f, _ in self.connection.run_on_commit if isinstance(f, _AtCommit)]
        batch = [event for p in pending for event in p.events]
        for p in pending:
            p.events = []
        if batch:
            _insert(self.using, batch)

    def commit_with_events(self) -> None:
        # If the insert fails, the commit raises and atomic() rolls back.
        if self.count and not self.connection.in_atomic_block:
            self.insert()
        self.commit()

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if self.count and self.table in sql:
            self.insert()
        return execute(sql, params, many, context)


def _insert_at_commit(connection: Any, using: str, batch: list[NewEvent]) -> None:
    pending = connection.__dict__.get("_changefeed_pending")
    if pending is None:
        pending = connection._changefeed_pending = _Pending(connection, using)
    pending.count += len(batch)
    if pending.wake[0]:
        # A new transaction (the last flag was used by a commit). A flag left
        # unused by a rollback serves the next transaction just as well.
        pending.wake = [False]
    hooks = connection.run_on_commit
    if hooks:
        # The previous save's events, at the same savepoint depth: one callback
        # can carry both, since a savepoint rollback would drop both alike.
        savepoints, last, _ = hooks[-1]
        if (
            type(last) is _AtCommit
            and last.wake is pending.wake
            and savepoints == set(connection.savepoint_ids)
        ):
            last.events.extend(batch)
            return
    transaction.on_commit(_AtCommit(using, batch, pending.wake), using=using)


def _insert(using: str, batch: list[NewEvent]) -> None:
    """INSERT the events with one statement per chunk, built directly.

    Every save of a registered model writes one event: going through
    ``Model.save`` (signals, the SQL compiler), or even building ``Event``
    instances and adapting each value with its field's ``get_db_prep_save``,
    cost more than the statement itself. The values are what those fields would
    send: the JSON columns' text (``json.dumps``, as Django's JSONField without
    an encoder), NULL for a missing key or payload, and one ``created_at`` for
    the batch, adapted by its field. The events' ids are not read back.
    """
    connection = connections[using]
    positions: list[int | None] | None = None
    if connection.vendor == "sqlite":
        positions = _number(connection, len(batch))
    if connection.vendor not in ("sqlite", "postgresql", "mysql"):
        Event.objects.using(using).bulk_create(
            [event.instance(p) for event, p in zip(batch, positions or [None] * len(batch))]
        )
        return
    qn = connection.ops.quote_name
    head = f"INSERT INTO {qn(Event._meta.db_table)} ({', '.join(qn(c) for c in _COLUMNS)}) VALUES "
    created_at: Any = Event._meta.get_field("created_at")
    created = created_at.get_db_prep_save(timezone.now(), connection)
    # Values this module makes (the time, labels, ops, positions, NULLs) go into
    # the statement as literals when they are plainly safe: each parameter costs
    # the driver an escaping call, and most events have four such values.
    created_sql = _literal(created) or "%s"
    starts: dict[tuple[str, str], tuple[str, list[Any]]] = {}
    dumps = json.dumps
    with connection.cursor() as cursor:
        for first in range(0, len(batch), _PER_STATEMENT):
            chunk = batch[first : first + _PER_STATEMENT]
            rows: list[str] = []
            params: list[Any] = []
            for n, (model, op, key, old_key, data, changed, routes) in enumerate(chunk, first):
                start = starts.get((model, op))
                if start is None:
                    start = starts[model, op] = _row_start(created, created_sql, model, op)
                params += start[1]
                params.append(dumps(key))
                row = start[0]
                for value in (old_key, data):
                    if value is None:
                        row += "NULL, "
                    else:
                        row += "%s, "
                        params.append(dumps(value))
                if changed is None:
                    row += "NULL, "
                else:
                    row += "%s, "
                    params.append(_dumped_names(changed))
                position = None if positions is None else positions[n]
                row += "NULL, " if position is None else f"{int(position)}, "
                if routes is None:
                    rows.append(row + "NULL)")
                else:
                    rows.append(row + "%s)")
                    params.append(routes)
            cursor.execute(head + ", ".join(rows), params)


def _row_start(created: Any, created_sql: str, model: str, op: str) -> tuple[str, list[Any]]:
    """The start of a row's VALUES up to its key (a parameter), and its parameters."""
    parts = [created_sql]
    params = [] if created_sql != "%s" else [created]
    for value in (model, op):
        literal = _literal(value)
        parts.append(literal or "%s")
        if literal is None:
            params.append(value)
    return "(" + ", ".join(parts) + ", %s, ", params


_PLAIN = re.compile(r"[A-Za-z0-9_.:+ -]*\Z")


def _literal(value: Any) -> str | None:
    """``value`` as an SQL string literal when it holds nothing that needs escaping
    (letters, digits, ``_ . : + -`` and spaces), else None: send it as a parameter."""
    if isinstance(value, str) and _PLAIN.match(value):
        return f"'{value}'"
    return None


_names: dict[tuple[str, ...], str] = {}


def _dumped_names(names: list[str]) -> str:
    """``json.dumps(names)`` for a list of field names, remembered: a model's
    creates all name the same fields."""
    key = tuple(names)
    found = _names.get(key)
    if found is None:
        if len(_names) >= 1000:
            _names.clear()
        found = _names[key] = json.dumps(names)
    return found


# The columns _insert writes, in its order; tests/test_outbox_write.py checks that
# they are the Event model's (all but the id).
_COLUMNS = ("created_at", "model", "op", "key", "old_key", "data", "changed", "position", "routes")
_PER_STATEMENT = 250  # rows per INSERT: 2,000 parameters, under every backend's limit


def _number(connection: Any, count: int) -> list[int | None] | None:
    """SQLite: the positions of ``count`` events about to be inserted.

    SQLite admits one writer at a time and this transaction holds the write
    lock (``lock``) until it commits, so no other transaction can commit events
    in between: positions given now are gap-free and visible in order, as the
    sequencer's are. Readers then find nothing to sequence, and never write (on
    SQLite a reader that writes takes the one write lock from every writer).
    Without the state row (a flushed database) the sequencer numbers them: None.
    """
    qn = connection.ops.quote_name
    table = qn(OutboxState._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {qn('last_position')}, {qn('pruned_through')} FROM {table} "
            f"WHERE {qn('id')} = 1"
        )
        row = cursor.fetchone()
        if row is None:
            return None
        last = max(int(row[0]), int(row[1]))
        cursor.execute(
            f"UPDATE {table} SET {qn('last_position')} = %s WHERE {qn('id')} = 1",
            [last + count],
        )
    return list(range(last + 1, last + count + 1))


class NewEvent(NamedTuple):
    """An event to write: the ``Event`` row's values but its id, position and time.

    Capture makes one per save; a plain tuple costs a fraction of a model instance.
    """

    model: str
    op: str
    key: list[Any]
    old_key: list[Any] | None = None
    data: dict[str, Any] | None = None
    changed: list[str] | None = None
    routes: str | None = None  # source/routes.py; None: no Target's filter reads the model

    def instance(self, position: int | None = None) -> Event:
        """As an unsaved ``Event`` (for a backend without the direct INSERT)."""
        return Event(
            model=self.model,
            op=self.op,
            key=self.key,
            old_key=self.old_key,
            data=self.data,
            changed=self.changed,
            position=position,
            routes=self.routes,
        )


class Change(NamedTuple):
    """An upsert event's content, before it is an ``Event`` or a statement's parameters."""

    label: str
    key: list[Any]
    old_key: list[Any] | None
    data: dict[str, Any]
    changed: list[str]

    def event(self, routes: str | None = None) -> NewEvent:
        return NewEvent(
            self.label, Event.UPSERT, self.key, self.old_key, self.data, self.changed, routes
        )


def make_event(
    label: str,
    op: str,
    key: Any,
    *,
    old_key: Any = None,
    data: Any = None,
    changed: Any = None,
) -> NewEvent:
    return NewEvent(label, op, list(key), old_key, data, changed)


def after_this_transaction(using: str) -> None:
    """Run ``after_commit`` once the current transaction commits (at once in autocommit)."""
    transaction.on_commit(lambda: after_commit(using), using=using)


def after_commit(using: str) -> None:
    """Events of ``using`` just committed: tell whoever listens (long-polls, push)."""
    send_events_committed(using)
