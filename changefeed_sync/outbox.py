"""Writing events, and giving them their feed positions once they committed.

Writers only INSERT: an event's ``id`` is its insertion order, taken when the
row is written, and ids commit out of order (transaction A takes 101, B takes
102 and commits first). A reader following ids would move past 101 before A
commits and never see it (the "visibility gap"). So the feed does not serve
ids: ``sequence`` gives committed events without a position the next
positions, in id order, under a lock only sequencers take (the ``OutboxState``
row). A position is given only to a committed event, so positions have no
gaps, and each batch of positions commits at once after the previous one, so
a reader that saw position n has seen every position below it. Nothing waits
for a slow transaction or guesses when to skip one (the trap of "high water
marks"): its events simply get later positions when it commits.

Writers never wait for each other on the outbox. On SQLite, which admits one
writer at a time anyway, ``lock`` takes the write lock early (see there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from django.db import IntegrityError, connections, transaction

from .models import Event, OutboxState, new_source_id
from .signals import send_events_committed

#: Events given positions per sequencer transaction.
SEQUENCE_BATCH = 5_000

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


def _create_state_row(using: str) -> None:
    """Create the state row, which the migration made but a flushed database lacks.

    Positions go on from the highest given (events may have outlived the row).
    On MySQL/MariaDB, outside a transaction, on a connection of its own in
    autocommit: created inside sequencers' transactions, two first sequencers
    would both hold shared locks on the new row and deadlock upgrading them.
    """
    connection = connections[using]
    if connection.vendor != "mysql" or connection.in_atomic_block:
        with transaction.atomic(using=using):
            # SQLite: the write lock first. get_or_create reads, then writes: against
            # a writer committing in between, that fails at once ("database is
            # locked"), and a feed request on a flushed source answered 500.
            lock(using)
            OutboxState.objects.using(using).get_or_create(
                id=1, defaults={"last_position": _highest_position(using)}
            )
        return
    wrapper = connections.create_connection(using)
    table = wrapper.ops.quote_name(OutboxState._meta.db_table)
    try:
        with wrapper.cursor() as cursor:
            try:
                cursor.execute(
                    f"INSERT INTO {table} (id, pruned_through, last_position, source_id) "
                    "VALUES (1, 0, %s, %s)",
                    [_highest_position(using), new_source_id()],
                )
            except IntegrityError:
                pass  # another process created it first
    finally:
        wrapper.close()


def _highest_position(using: str) -> int:
    found = Event.objects.using(using).order_by("-position").values_list("position", flat=True)
    highest = found.filter(position__isnull=False).first()
    return int(highest or 0)


class State(NamedTuple):
    pruned_through: int
    source_id: str


def state(using: str) -> State:
    """How far the outbox was pruned, and its identity (README, "Source identity").

    A database flushed since its migrations lacks the row: it is created, with a
    new identity (a flushed outbox is a new one: positions start again).
    """
    for _ in range(2):
        found = (
            OutboxState.objects.using(using)
            .filter(id=1)
            .values_list("pruned_through", "source_id")
            .first()
        )
        if found is not None and found[1]:
            return State(int(found[0]), str(found[1]))
        if found is None:
            _create_state_row(using)  # with a new id
        else:  # emptied by hand: draw one, unless another process just did
            OutboxState.objects.using(using).filter(id=1, source_id="").update(
                source_id=new_source_id()
            )
    raise RuntimeError("changefeed_sync: the outbox state row cannot be created")


def reset_source_id(using: str) -> str:
    """Give this outbox a new identity (after restoring it from a backup): every
    target's checkpoint then belongs to the former one, and each needs a full Data Pull."""
    state(using)
    value = new_source_id()
    OutboxState.objects.using(using).filter(id=1).update(source_id=value)
    return value


def write(using: str, events: Iterable[Event], *, locked: bool = False) -> None:
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

    __slots__ = ("using", "events")

    def __init__(self, using: str, events: list[Event]) -> None:
        self.using = using
        self.events = events

    def __call__(self) -> None:
        after_commit(self.using)


class _Pending:
    """Inserts a connection's pending events before its commit and before any
    statement that reads the outbox (one per connection object)."""

    def __init__(self, connection: Any, using: str) -> None:
        self.connection = connection
        self.using = using
        self.count = 0  # events deferred since the last insert (savepoints may drop some)
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


def _insert_at_commit(connection: Any, using: str, batch: list[Event]) -> None:
    pending = connection.__dict__.get("_changefeed_pending")
    if pending is None:
        pending = connection._changefeed_pending = _Pending(connection, using)
    pending.count += len(batch)
    transaction.on_commit(_AtCommit(using, batch), using=using)


def _insert(using: str, batch: list[Event]) -> None:
    """INSERT the events with one statement per chunk, built directly.

    Every save of a registered model writes one event: going through
    ``Model.save`` (signals, the SQL compiler) cost more than the statement
    itself. Values are adapted by each field's ``get_db_prep_save``, as the
    ORM does; the events' ids are not read back (nothing needs them).
    """
    connection = connections[using]
    if connection.vendor == "sqlite":
        _number(connection, batch)
    if connection.vendor not in ("sqlite", "postgresql", "mysql"):
        Event.objects.using(using).bulk_create(batch)
        return
    fields = _event_fields()
    qn = connection.ops.quote_name
    head = (
        f"INSERT INTO {qn(Event._meta.db_table)} "
        f"({', '.join(qn(str(f.column)) for f in fields)}) VALUES "
    )
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    per_statement = max(1, min(500, 2000 // len(fields)))
    with connection.cursor() as cursor:
        for start in range(0, len(batch), per_statement):
            chunk = batch[start : start + per_statement]
            params = [
                f.get_db_prep_save(f.pre_save(event, True), connection)
                for event in chunk
                for f in fields
            ]
            cursor.execute(head + ", ".join([row] * len(chunk)), params)


def _number(connection: Any, batch: list[Event]) -> None:
    """SQLite: the events' positions, given as they are inserted.

    SQLite admits one writer at a time and this transaction holds the write
    lock (``lock``) until it commits, so no other transaction can commit events
    in between: positions given now are gap-free and visible in order, as the
    sequencer's are. Readers then find nothing to sequence, and never write (on
    SQLite a reader that writes takes the one write lock from every writer).
    Without the state row (a flushed database) the sequencer numbers them.
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
            return
        last = max(int(row[0]), int(row[1]))
        for n, event in enumerate(batch, 1):
            event.position = last + n
        cursor.execute(
            f"UPDATE {table} SET {qn('last_position')} = %s WHERE {qn('id')} = 1",
            [last + len(batch)],
        )


# ---------------------------------------------------------------- positions


def sequence(using: str) -> None:
    """Give every committed event without a position the next positions, in id order.

    Cheap when there is nothing to do (one indexed read). Otherwise one short
    transaction per ``SEQUENCE_BATCH`` events, under the state row's lock,
    which only sequencers take: writers never wait for it. Called before
    reading the feed, so a reader always sees every event committed before it
    asked; any process may call it, and they queue up on the lock.

    Inside an atomic block it runs in that transaction (a savepoint) and its
    lock is held until the transaction ends: call it outside one where you can.
    """
    connection = connections[using]
    qn = connection.ops.quote_name
    events = qn(Event._meta.db_table)
    pending_sql = f"SELECT 1 FROM {events} WHERE {qn('position')} IS NULL LIMIT 1"
    with connection.cursor() as cursor:
        cursor.execute(pending_sql)
        if cursor.fetchone() is None:
            return
    while _sequence_batch(using) >= SEQUENCE_BATCH:
        pass


def _sequence_batch(using: str) -> int:
    """One sequencer transaction; the number of events it gave positions to."""
    connection = connections[using]
    qn = connection.ops.quote_name
    events = qn(Event._meta.db_table)
    state_table = qn(OutboxState._meta.db_table)
    nested = connection.in_atomic_block
    for _ in range(2):
        with transaction.atomic(using=using):
            with connection.cursor() as cursor:
                if connection.vendor == "postgresql" and not nested:
                    # Each statement must see what committed before it, above all
                    # the previous sequencer's positions (under REPEATABLE READ the
                    # snapshot would be older than the lock): the first statement.
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                lock(using)  # SQLite: the write lock before the first read
                # A locking read returns the latest committed row in every
                # isolation level; on MySQL/MariaDB it comes before any plain
                # read, so the transaction's read view is taken after the lock.
                for_update = " FOR UPDATE" if connection.features.has_select_for_update else ""
                cursor.execute(
                    f"SELECT {qn('last_position')}, {qn('pruned_through')} FROM {state_table} "
                    f"WHERE {qn('id')} = 1{for_update}"
                )
                row = cursor.fetchone()
                if row is None:
                    missing = True
                else:
                    missing = False
                    last = max(int(row[0]), int(row[1]))
                    cursor.execute(
                        f"SELECT {qn('id')} FROM {events} WHERE {qn('position')} IS NULL "
                        f"ORDER BY {qn('id')} LIMIT {SEQUENCE_BATCH}"
                    )
                    ids = [int(r[0]) for r in cursor.fetchall()]
                    if ids:
                        _assign(connection, cursor, ids, last)
                        cursor.execute(
                            f"UPDATE {state_table} SET {qn('last_position')} = %s "
                            f"WHERE {qn('id')} = 1",
                            [last + len(ids)],
                        )
                    return len(ids)
        if missing:
            _create_state_row(using)
    raise RuntimeError("changefeed_sync: the outbox state row cannot be created")


def _assign(connection: Any, cursor: Any, ids: list[int], last: int) -> None:
    """Positions ``last + 1``, ``last + 2``... to ``ids`` (sorted), in as few statements
    as the database allows."""
    qn = connection.ops.quote_name
    events = qn(Event._meta.db_table)
    position, id_ = qn("position"), qn("id")
    if connection.vendor == "postgresql":
        cursor.execute(
            f"UPDATE {events} SET {position} = v.p FROM unnest(%s::bigint[], %s::bigint[]) "
            f"AS v(i, p) WHERE {events}.{id_} = v.i",
            [ids, list(range(last + 1, last + 1 + len(ids)))],
        )
        return
    from .keys import max_params

    per_statement = max(1, min(1000, (max_params(connection.alias) - 1) // 2))
    for start in range(0, len(ids), per_statement):
        chunk = ids[start : start + per_statement]
        marks = ", ".join(["%s"] * len(chunk))
        base = last + start
        if connection.vendor == "mysql":
            # FIELD(id, a, b, ...) is id's place in the list, counted from 1.
            cursor.execute(
                f"UPDATE {events} SET {position} = %s + FIELD({id_}, {marks}) "
                f"WHERE {id_} IN ({marks})",
                [base, *chunk, *chunk],
            )
        else:
            cases = " ".join(["WHEN %s THEN %s"] * len(chunk))
            params: list[Any] = []
            for n, event_id in enumerate(chunk, 1):
                params.extend((event_id, base + n))
            cursor.execute(
                f"UPDATE {events} SET {position} = CASE {id_} {cases} END "
                f"WHERE {id_} IN ({marks})",
                [*params, *chunk],
            )


def head(using: str) -> int:
    """The last position given (after giving positions to what committed): no
    reader's cursor can be beyond it.

    Every waiting follower's notifier asks this once per interval: so one plain
    statement when nothing waits for a position (the state row, and whether any
    event lacks one, seen in one snapshot), the sequencer only when one does.
    """
    connection = connections[using]
    qn = connection.ops.quote_name
    sql = (
        f"SELECT {qn('last_position')}, {qn('pruned_through')}, EXISTS(SELECT 1 FROM "
        f"{qn(Event._meta.db_table)} WHERE {qn('position')} IS NULL) "
        f"FROM {qn(OutboxState._meta.db_table)} WHERE {qn('id')} = 1"
    )
    for _ in range(2):
        with connection.cursor() as cursor:
            cursor.execute(sql)
            found = cursor.fetchone()
        if found is not None and not found[2]:
            return max(int(found[0]), int(found[1]))
        if found is None:
            state(using)  # a flushed database: the row, with a new identity
        sequence(using)
    # Writers keep committing: what the sequencer just gave out is the head.
    with connection.cursor() as cursor:
        cursor.execute(sql)
        found = cursor.fetchone()
    return max(int(found[0]), int(found[1]))


class Change(NamedTuple):
    """An upsert event's content, before it is an ``Event`` or a statement's parameters."""

    label: str
    key: list[Any]
    old_key: list[Any] | None
    data: dict[str, Any]
    changed: list[str]

    def event(self) -> Event:
        return make_event(
            self.label,
            Event.UPSERT,
            self.key,
            old_key=self.old_key,
            data=self.data,
            changed=self.changed,
        )


_fields: list[Any] = []


def _event_fields() -> list[Any]:
    if not _fields:
        _fields.extend(f for f in Event._meta.concrete_fields if not f.primary_key)
    return _fields


def make_event(
    label: str,
    op: str,
    key: Any,
    *,
    old_key: Any = None,
    data: Any = None,
    changed: Any = None,
) -> Event:
    return Event(model=label, op=op, key=list(key), old_key=old_key, data=data, changed=changed)


def after_this_transaction(using: str) -> None:
    """Run ``after_commit`` once the current transaction commits (at once in autocommit)."""
    transaction.on_commit(lambda: after_commit(using), using=using)


def after_commit(using: str) -> None:
    """Events of ``using`` just committed: tell whoever listens (long-polls, push)."""
    send_events_committed(using)
