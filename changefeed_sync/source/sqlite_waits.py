"""Waiting for SQLite's lock by trying again every millisecond.

SQLite admits one writer at a time, and a committing writer briefly locks out
readers too. Its own busy handler waits by sleeping longer and longer between
attempts (up to 100 ms each). Against a source that commits many times per
second, a feed request's or a delivery's statements then kept waking up inside
the next commit: single statements waited up to 1.5 s, the replay-guard write
of a feed request up to 5.7 s (measured at 100 commits/s, bench/lag.py).
Trying every millisecond gets in at the first gap between commits. Readers
cannot starve writers this way: a writer waiting to commit blocks new readers.

- ``prompt_lock_waits(using)``: within the block, a statement outside a
  transaction that finds the database locked is tried again every
  millisecond, up to the connection's ``timeout``. Statements inside a
  transaction are left to SQLite's busy handler (SQLite cannot retry a
  statement of a transaction that already holds locks), unless the
  transaction is run by ``retry_transaction``.
- ``retry_transaction(using, work)``: runs ``work`` (which opens its own
  ``atomic()``) with no SQLite waiting at all, and on "database is locked"
  rolls it back and runs it again a millisecond later, up to the timeout.
  ``work`` must be safe to run again (it is, being rolled back each time).

Other databases wait in their own, fair, way: both are then plain calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from django.db import OperationalError, connections

T = TypeVar("T")

# Set on a connection wrapper while retry_transaction runs its work.
_WHOLE_TRANSACTION = "_changefeed_retry_transaction"
_BUSY_TIMEOUT = "_changefeed_busy_timeout"


def _timeout(connection: Any) -> float:
    return float(connection.settings_dict.get("OPTIONS", {}).get("timeout", 5.0))


def _locked(exc: OperationalError) -> bool:
    return "database is locked" in str(exc)


def _set_busy_timeout(connection: Any, prompt: bool) -> None:
    """Busy timeout 0 (fail at once, we retry) or the configured one."""
    raw = connection.connection
    if raw is None:
        return
    wanted = 0 if prompt else int(_timeout(connection) * 1000)
    # Remembered on the Django wrapper, for the driver connection it holds now.
    if getattr(connection, _BUSY_TIMEOUT, None) != (id(raw), wanted):
        raw.execute(f"PRAGMA busy_timeout = {wanted}")
        setattr(connection, _BUSY_TIMEOUT, (id(raw), wanted))


@contextmanager
def prompt_lock_waits(using: str) -> Iterator[None]:
    connection = connections[using]
    if connection.vendor != "sqlite":
        yield
        return
    timeout = _timeout(connection)

    def retry_when_locked(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
        wrapper = context["connection"]
        if wrapper.in_atomic_block:
            # retry_transaction retries the whole transaction; any other one waits
            # in SQLite's busy handler, as it would without this block.
            _set_busy_timeout(wrapper, getattr(wrapper, _WHOLE_TRANSACTION, False))
            return execute(sql, params, many, context)
        _set_busy_timeout(wrapper, True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return execute(sql, params, many, context)
            except OperationalError as exc:
                if not _locked(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.001)

    try:
        with connection.execute_wrapper(retry_when_locked):
            yield
    finally:
        _set_busy_timeout(connection, False)


def retry_transaction(using: str, work: Callable[[], T]) -> T:
    connection = connections[using]
    if connection.vendor != "sqlite" or connection.in_atomic_block:
        return work()  # inside a caller's transaction nothing can be retried
    connection.ensure_connection()
    deadline = time.monotonic() + _timeout(connection)
    setattr(connection, _WHOLE_TRANSACTION, True)
    try:
        while True:
            _set_busy_timeout(connection, True)
            try:
                return work()
            except OperationalError as exc:
                if not _locked(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.001)
    finally:
        setattr(connection, _WHOLE_TRANSACTION, False)
        _set_busy_timeout(connection, False)
