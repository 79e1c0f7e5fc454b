"""Writing events, serialized so that positions become visible in commit order.

Why serialize: with several writers, transaction A may take id 101 and
commit after B took 102, so a reader that saw 102 would never see 101 (the
"visibility gap"). Holding one lock from the first event until commit makes
commit order equal id order:

- PostgreSQL: a transaction-scoped advisory lock (a save sent as one
  statement takes it inside that statement: ``outbox_pg``);
- MySQL/MariaDB: the row lock of the single ``OutboxState`` row, taken by
  an ``INSERT ... ON DUPLICATE KEY UPDATE`` that also recreates a flushed row;
- other databases: ``SELECT ... FOR UPDATE`` on that row;
- SQLite: the database itself admits one writer at a time; the lock only
  takes SQLite's write lock early (see ``lock``).

The price is that transactions writing registered models are serialized
with each other from their first synced write until commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

from django.db import IntegrityError, connections, transaction

from .models import Event, OutboxState, new_source_id

# "cfsy" in ASCII; any constant works, it only has to be ours.
ADVISORY_KEY = 0x63667379

_new_events = threading.Condition()


def lock(using: str) -> None:
    """Take the outbox lock for the current transaction (re-entrant, released at commit)."""
    connection = connections[using]
    if not connection.in_atomic_block:
        raise RuntimeError("changefeed_sync: the outbox lock needs a transaction (atomic block)")
    vendor = connection.vendor
    with connection.cursor() as cursor:
        if vendor == "sqlite":
            if getattr(connection, "transaction_mode", None) == "IMMEDIATE":
                return  # BEGIN IMMEDIATE took the write lock already (the W001 setting)
            # SQLite already admits one writer at a time, but a transaction that
            # reads first and writes later fails at once ("database is locked")
            # if another writer got in between. Writing first takes the write
            # lock up front, waiting for it like any plain write would. A write
            # that matches no row takes the lock without dirtying a page (which
            # would cost a journal write at commit).
            table = connection.ops.quote_name(OutboxState._meta.db_table)
            cursor.execute(f"DELETE FROM {table} WHERE id = -1")
        elif vendor == "postgresql":
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ADVISORY_KEY])
        elif vendor == "mysql":
            # Lock the row, creating it if a flush removed it, in one statement:
            # no locking read of a missing row (a gap lock), no shared lock on a
            # duplicate to upgrade later (a deadlock between first writers).
            table = connection.ops.quote_name(OutboxState._meta.db_table)
            cursor.execute(
                f"INSERT INTO {table} (id, pruned_through, source_id) VALUES (1, 0, %s) "
                "ON DUPLICATE KEY UPDATE id = id",
                [new_source_id()],
            )
        else:
            table = connection.ops.quote_name(OutboxState._meta.db_table)
            cursor.execute(f"SELECT id FROM {table} WHERE id = 1 FOR UPDATE")
            if cursor.fetchone() is None:
                _create_state_row(using)
                cursor.execute(f"SELECT id FROM {table} WHERE id = 1 FOR UPDATE")


def _create_state_row(using: str) -> None:
    """Create the lock row, which the migration made but a flushed database lacks.

    On a connection of its own, in autocommit: created inside the writers'
    transactions, two first writers would both hold shared locks on the new
    row and deadlock upgrading them.
    """
    wrapper = connections.create_connection(using)
    table = wrapper.ops.quote_name(OutboxState._meta.db_table)
    try:
        with wrapper.cursor() as cursor:
            try:
                cursor.execute(
                    f"INSERT INTO {table} (id, pruned_through, source_id) VALUES (1, 0, %s)",
                    [new_source_id()],
                )
            except IntegrityError:
                pass
    finally:
        wrapper.close()


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
            OutboxState.objects.using(using).get_or_create(id=1)  # default: a new id
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

    ``locked``: the caller already took ``lock()`` in this transaction (one
    round trip less per save).
    """
    batch = list(events)
    if not batch:
        return
    with transaction.atomic(using=using, savepoint=False):
        if not locked:
            lock(using)
        _insert(using, batch)
        transaction.on_commit(lambda: after_commit(using), using=using)


def _insert(using: str, batch: list[Event]) -> None:
    """INSERT the events with one statement per chunk, built directly.

    Every save of a registered model writes one event: going through
    ``Model.save`` (signals, the SQL compiler) cost more than the statement
    itself. Values are adapted by each field's ``get_db_prep_save``, as the
    ORM does; the events' ids are not read back (nothing needs them).
    """
    connection = connections[using]
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


def after_commit(using: str) -> None:
    """Wake long-polls and schedule deliveries: events of ``using`` just committed."""
    notify()
    from . import push

    try:
        push.on_commit(using)
    except Exception:  # the data is committed; a delivery problem must not fail the writer
        logging.getLogger("changefeed_sync.push").exception("scheduling deliveries failed")


def notify() -> None:
    """Wake long-polls in this process; other processes notice on their next poll."""
    with _new_events:
        _new_events.notify_all()


def wait(timeout: float) -> None:
    """Sleep until ``notify()`` or ``timeout`` seconds, whichever comes first."""
    with _new_events:
        _new_events.wait(timeout)
