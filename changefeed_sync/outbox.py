"""Writing events, serialized so that positions become visible in commit order.

Why serialize: with several writers, transaction A may take id 101 and
commit after B took 102, so a reader that saw 102 would never see 101 (the
"visibility gap"). Holding one lock from the first event until commit makes
commit order equal id order:

- PostgreSQL: a transaction-scoped advisory lock;
- MySQL/MariaDB and others: ``SELECT ... FOR UPDATE`` on the single
  ``OutboxState`` row;
- SQLite: nothing to do, the database itself admits one writer at a time.

The price is that transactions writing registered models are serialized
with each other from their first synced write until commit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from django.db import connections, transaction

from .models import Event, OutboxState

# "cfsy" in ASCII; any constant works, it only has to be ours.
_ADVISORY_KEY = 0x63667379

_new_events = threading.Condition()


def lock(using: str) -> None:
    """Take the outbox lock for the current transaction (re-entrant, released at commit)."""
    connection = connections[using]
    if not connection.in_atomic_block:
        raise RuntimeError("changefeed_sync: the outbox lock needs a transaction (atomic block)")
    vendor = connection.vendor
    if vendor == "sqlite":
        return
    with connection.cursor() as cursor:
        if vendor == "postgresql":
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ADVISORY_KEY])
        else:
            table = connection.ops.quote_name(OutboxState._meta.db_table)
            cursor.execute(f"SELECT id FROM {table} WHERE id = 1 FOR UPDATE")
            if cursor.fetchone() is None:
                # The migration creates the row; a flushed test database may not have it.
                OutboxState.objects.using(using).get_or_create(id=1)
                cursor.execute(f"SELECT id FROM {table} WHERE id = 1 FOR UPDATE")


def write(using: str, events: Iterable[Event]) -> None:
    """Insert events in the caller's transaction and wake long-polls after commit."""
    batch = list(events)
    if not batch:
        return
    with transaction.atomic(using=using, savepoint=False):
        lock(using)
        if len(batch) == 1:
            batch[0].save(using=using, force_insert=True)
        else:
            Event.objects.using(using).bulk_create(batch)
        transaction.on_commit(notify, using=using)


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


def notify() -> None:
    """Wake long-polls in this process; other processes notice on their next poll."""
    with _new_events:
        _new_events.notify_all()


def wait(timeout: float) -> None:
    """Sleep until ``notify()`` or ``timeout`` seconds, whichever comes first."""
    with _new_events:
        _new_events.wait(timeout)
