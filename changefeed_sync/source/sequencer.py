"""Giving committed events their feed positions: the sequencer, and the outbox's
state row (the last position given, how far it was pruned, its identity).

Writers only INSERT (``outbox``): an event's ``id`` is its insertion order, taken
when the row is written, and ids commit out of order (transaction A takes 101, B
takes 102 and commits first). A reader following ids would move past 101 before A
commits and never see it (the "visibility gap"). So the feed does not serve ids:
``sequence`` gives committed events without a position the next positions, in id
order, under a lock only sequencers take (the ``OutboxState`` row). A position is
given only to a committed event, so positions have no gaps, and each batch of
positions commits at once after the previous one, so a reader that saw position n
has seen every position below it. Nothing waits for a slow transaction or guesses
when to skip one (the trap of "high water marks"): its events simply get later
positions when it commits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from django.db import IntegrityError, connections, transaction

from ..keys import max_params
from ..models import Event, OutboxState, new_source_id
from ..outbox import lock

#: Events given positions per sequencer transaction.
SEQUENCE_BATCH = 5_000



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
