"""One watcher of the feed's head per process and database: what long-polls wait on.

A long-poll that looked for events by itself cost one query per waiting follower
per interval (50 followers: 2,500 queries/s while nothing changed) and, in a
synchronous view, a server thread for its whole wait. Here one daemon thread per
process and database alias asks for the head position (``feed.head``) once per
``CHANGEFEED_SYNC_FEED_POLL_INTERVAL`` while anyone waits, whatever their number,
and wakes every waiter the head has passed: asyncio tasks (``await_head``, woken
through their own loop's ``call_soon_threadsafe``), so an async view waits holding
no thread at all.

- ``poke(using)``: events may have committed in this process, look now (the
  outbox calls it after each commit); other processes' commits are seen within
  one interval.
- Nobody waiting: no query. Nobody for ``IDLE_EXIT`` seconds: the thread closes
  its connection and ends; the next waiter starts another.
- A failing check (the database restarting) closes the thread's connection and
  is tried again later, with a growing delay; the thread keeps running.

A waiter is woken only by a check that ends after it began waiting, never by the
head an earlier check saw: that head may belong to a database that was reset
since (the waiter's own read, made after that check, found nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connections

from .. import conf

logger = logging.getLogger("changefeed_sync.notifier")

#: Seconds without any waiter after which the thread closes its connection and ends.
IDLE_EXIT = 10.0
#: Longest pause between checks that keep failing (the database is down).
ERROR_DELAY_MAX = 2.0


class _Waiter:
    """One wait: woken once the head is beyond ``floor``, with the head that woke it."""

    __slots__ = ("floor", "head", "loop", "future")

    def __init__(
        self, floor: int, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]
    ) -> None:
        self.floor = floor
        self.head: int | None = None
        self.loop = loop
        self.future = future


class Notifier:
    """The watcher of one database alias's head, in this process."""

    def __init__(self, using: str) -> None:
        self.using = using
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiters: set[_Waiter] = set()
        # No waiter's floor is below this (None: no waiter since the last scan);
        # a check scans the waiters only when the head passes it.
        self._low: int | None = None
        self._head: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failing = False
        self._last_waiter = time.monotonic()
        # Counters, for stats(): honest figures for tests and benchmarks.
        self.checks = 0
        self.statements = 0
        self.errors = 0
        self.threads_started = 0

    # ------------------------------------------------------------ waiters

    def add(self, waiter: _Waiter) -> None:
        with self._lock:
            first = not self._waiters
            self._waiters.add(waiter)
            if self._low is None or waiter.floor < self._low:
                self._low = waiter.floor
            self._last_waiter = time.monotonic()
            if self._thread is None:
                self._start()
            elif first:
                self._wake.set()  # it sleeps while nobody waits

    def discard(self, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)
            self._last_waiter = time.monotonic()

    def poke(self) -> None:
        with self._lock:
            if self._waiters:
                self._wake.set()

    # ------------------------------------------------------------ the thread

    def _start(self) -> None:
        """Start the thread (the lock is held)."""
        self._stopping = False
        self.threads_started += 1
        thread = threading.Thread(
            target=self._run, name=f"changefeed-notifier-{self.using}", daemon=True
        )
        self._thread = thread
        thread.start()

    def _run(self) -> None:
        delay = 0.0  # pause before the next check after failures
        try:
            while True:
                with self._lock:
                    idle_for = time.monotonic() - self._last_waiter
                    if self._stopping or (not self._waiters and idle_for >= IDLE_EXIT):
                        self._thread = None
                        return
                    waiting = bool(self._waiters)
                if not waiting:
                    # Nobody waits: no query until somebody does, or it is time to end.
                    self._wake.wait(IDLE_EXIT - idle_for)
                    self._wake.clear()
                    continue
                # Somebody waits: check once per interval, or at once when poked.
                self._wake.wait(delay or conf.feed_poll_interval())
                self._wake.clear()
                with self._lock:
                    if not self._waiters:
                        continue  # they left meanwhile: nothing to check for
                if self._check():
                    delay = 0.0
                else:
                    delay = min(max(2 * delay, conf.feed_poll_interval()), ERROR_DELAY_MAX)
        finally:
            self._close_connection()

    def _count(self, execute: Callable[..., Any], sql: str, params: Any, many: bool,
               context: dict[str, Any]) -> Any:  # fmt: skip
        self.statements += 1
        return execute(sql, params, many, context)

    def _check(self) -> bool:
        """Ask for the head once and wake those it passed; False when that failed."""
        from . import feed

        try:
            with connections[self.using].execute_wrapper(self._count):
                head = feed.head(self.using)
        except Exception:
            # The database restarting, a network problem: start again from a new
            # connection. Logged once per run of failures.
            self.errors += 1
            if not self._failing:
                logger.warning(
                    "checking the feed's head on %r failed; trying again", self.using,
                    exc_info=True,
                )  # fmt: skip
                self._failing = True
            else:
                logger.debug("checking the feed's head on %r failed again", self.using,
                             exc_info=True)  # fmt: skip
            self._close_connection()
            return False
        if self._failing:
            logger.info("checking the feed's head on %r works again", self.using)
            self._failing = False
        self.checks += 1
        woken: list[_Waiter] = []
        with self._lock:
            self._head = head
            if self._low is not None and head > self._low:
                low: int | None = None
                for waiter in self._waiters:
                    if head > waiter.floor:
                        waiter.head = head
                        woken.append(waiter)
                    elif low is None or waiter.floor < low:
                        low = waiter.floor
                self._waiters.difference_update(woken)
                self._low = low
        _wake_all(woken)
        return True

    def _close_connection(self) -> None:
        try:
            connections[self.using].close()
        except Exception:  # a broken connection may fail to close: it is dropped anyway
            logger.debug("closing the notifier's connection failed", exc_info=True)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _wake_all(woken: list[_Waiter]) -> None:
    """Wake each event loop's tasks with one call into that loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for waiter in woken:
        by_loop.setdefault(waiter.loop, []).append(waiter.future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures)
        except RuntimeError:  # the loop was closed: nobody is left to wake there
            pass


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # it may have been cancelled (the client went away)
            future.set_result(None)


# ---------------------------------------------------------------- one per alias

_registry_lock = threading.Lock()
_notifiers: dict[str, Notifier] = {}


def notifier(using: str) -> Notifier:
    """This process's notifier of ``using`` (created on first use; its thread too)."""
    with _registry_lock:
        found = _notifiers.get(using)
        if found is None:
            found = _notifiers[using] = Notifier(using)
        return found


def _forget_after_fork() -> None:
    """A forked child (a server's worker) has none of its parent's threads: it
    starts notifiers of its own when it needs them."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _notifiers.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def poke(using: str) -> None:
    """Events may have committed in this process: check at once (thread-safe, never blocks
    for long; nothing happens when nobody waits)."""
    found = _notifiers.get(using)
    if found is not None:
        found.poke()


def on_events_committed(sender: Any, using: str, **kwargs: Any) -> None:
    """``events_committed`` receiver: this process's waiters check at once (other
    processes' notifiers find the events by polling or NOTIFY)."""
    poke(using)


async def await_head(using: str, since: int, timeout: float) -> int | None:
    """Wait until the head is beyond ``since`` (return it) or ``timeout`` seconds passed
    (return None). The task waits on a future, holding no thread."""
    if timeout <= 0:
        return None
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    waiter = _Waiter(since, loop, future)
    watcher = notifier(using)
    watcher.add(waiter)
    try:
        await asyncio.wait((future,), timeout=timeout)
    finally:
        watcher.discard(waiter)
    return waiter.head if future.done() and not future.cancelled() else None


def stats(using: str) -> dict[str, Any]:
    """What the notifier of ``using`` did so far in this process."""
    found = notifier(using)
    with found._lock:
        return {
            "waiting": len(found._waiters),
            "running": found._thread is not None,
            "checks": found.checks,
            "statements": found.statements,
            "errors": found.errors,
            "threads_started": found.threads_started,
            "head": found._head,
        }


def shutdown(timeout: float = 5.0) -> None:
    """Stop every notifier thread of this process and close its connection (tests; a
    process that wants its database connections closed before it exits)."""
    with _registry_lock:
        found = list(_notifiers.values())
        _notifiers.clear()
    for watcher in found:
        watcher.stop(timeout)
