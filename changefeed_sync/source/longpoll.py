"""Long-poll: a feed page now, or as soon as there is one, for asyncio callers.

Read a page; if it is empty and the caller may wait, wait on the notifier (which
asks for the head once per interval for the whole process, notifier.py) and read
again once the head moved. No HTTP here: views.py decides who may wait.

Database work of async callers runs in a small pool of threads of its own
(``DB_THREADS``, and ``WAKE_THREADS`` for the reads after a wake), never on the
event loop. Django's connections belong to a thread, so these threads keep
theirs as a request thread would: checked before each use (a broken one is
replaced), closed after it unless ``CONN_MAX_AGE`` keeps it. The pool's size
bounds the connections; a waiting follower holds none.

Many followers woken by one event mostly ask for the same page (same cursor,
limit and models), so the reads made after a wake go through a small per-process
cache keyed by the head that woke them: the first reader reads, the others take
its page (those who came while it read wait for it). A page of events after a
cursor, read once the head was seen at h, holds every event up to h and is not
wrong later: events do not change once they have a position. Unless the outbox
was replaced meanwhile (a flushed or restored database, where the same positions
name other events): so the key holds the outbox's identity (``source_id``, new
in a flushed database), and a page is shared for ``CACHE_SECONDS`` only (a
restored one keeps its identity; its head would have to pass the same position
again within that time). Failed reads are not kept: everyone who waited for one
reads for himself.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import close_old_connections

from . import feed, notifier
from .feed import FeedPage
from .sqlite_waits import prompt_lock_waits

T = TypeVar("T")

#: Threads (and so at most this many database connections per alias) doing the
#: database work of async requests in one process. Few: the work is mostly Python
#: (the ORM) under one GIL, and every busy thread delays the event loop that answers
#: the waiting followers (a thread keeps the GIL up to 5 ms at a time).
DB_THREADS = 4
#: And one more for the reads after a wake, so that woken followers are answered
#: without queueing behind the new requests of those answered first.
WAKE_THREADS = 1
#: Pages kept by the cache of reads after a wake, and their total size.
CACHE_PAGES = 64
CACHE_BYTES = 8 * 1024 * 1024
#: Seconds a page read after a wake is shared (followers woken together ask within
#: milliseconds of each other).
CACHE_SECONDS = 5.0
#: Seconds without a page after which a streamed feed sends an empty line: the
#: follower's read timeout (CHANGEFEED_SYNC_REQUEST_TIMEOUT) sees a live source, and
#: a dead connection is found within this time.
HEARTBEAT = 5.0


@dataclass(frozen=True)
class Outcome:
    """What a long-poll answers: ``page``; ``refused`` when it would have waited but
    no waiting slot was free (the page is then the empty one read at once)."""

    page: FeedPage
    refused: bool = False


class WaitSlots:
    """How many long-polls of this process may wait at once: ``limit()`` of them, read
    on every try (so a changed setting applies at once)."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.taken = 0
        #: The most ever taken at once (what the bound allowed, seen from outside).
        self.most = 0

    def try_take(self, limit: int | None = None) -> bool:
        allowed = self.limit() if limit is None else limit
        with self._lock:
            if self.taken >= allowed:
                return False
            self.taken += 1
            self.most = max(self.most, self.taken)
            return True

    def give_back(self) -> None:
        with self._lock:
            self.taken -= 1


# ---------------------------------------------------------------- database threads

_executors: dict[str, ThreadPoolExecutor] = {}
_executor_lock = threading.Lock()


def run_db(work: Callable[..., T], *args: Any) -> T:
    """Run ``work`` as a request would, in a thread that is not a request's: with this
    thread's connections checked before (broken or expired ones are closed, so the work
    opens new ones) and closed after unless ``CONN_MAX_AGE`` keeps them."""
    close_old_connections()
    try:
        return work(*args)
    finally:
        close_old_connections()


async def in_db_thread(work: Callable[..., T], *args: Any, lane: str = "db") -> T:
    """``run_db(work, *args)`` in one of the pool's threads (``lane`` "wake": the
    thread of the reads after a wake); the caller's task waits without blocking its
    event loop."""
    with _executor_lock:
        executor = _executors.get(lane)
        if executor is None:
            size = WAKE_THREADS if lane == "wake" else DB_THREADS
            executor = _executors[lane] = ThreadPoolExecutor(
                size, thread_name_prefix=f"changefeed-{lane}"
            )
    call = functools.partial(contextvars.copy_context().run, run_db, work, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


# ---------------------------------------------------------------- reads after a wake


class _Flight:
    """One read of a page after a wake: in flight until ``done``; then ``page``, or None
    when it failed."""

    __slots__ = ("done", "page", "futures", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.page: FeedPage | None = None
        self.futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []


_Key = tuple[str, str, int, int, "tuple[str, ...] | None", int, "feed.Routed | None"]
_cache_lock = threading.Lock()
_flights: OrderedDict[_Key, _Flight] = OrderedDict()
_cached_bytes = 0
#: Reads made by the cache, and pages it handed out without reading.
counters = {"reads": 0, "shared": 0}


def _forget_after_fork() -> None:
    """A forked worker has none of its parent's threads: a pool of its own, no flight."""
    global _executor_lock, _cache_lock, _cached_bytes
    _executors.clear()
    _executor_lock = threading.Lock()
    _cache_lock = threading.Lock()
    _flights.clear()
    _cached_bytes = 0


os.register_at_fork(after_in_child=_forget_after_fork)


def read(
    using: str,
    since: int,
    limit: int,
    models: list[str] | None,
    source_id: str | None = None,
    routed: feed.Routed | None = None,
) -> FeedPage:
    """One feed page (on SQLite, waiting for a busy writer promptly: sqlite_waits.py),
    carrying ``source_id`` when given; ``routed``: a filtered Target's (feed.read)."""
    with prompt_lock_waits(using):
        page = feed.read(since, limit, using=using, models=models, routed=routed)
    return dataclasses.replace(page, source_id=source_id) if source_id else page


def _key(
    using: str,
    source_id: str,
    since: int,
    limit: int,
    models: list[str] | None,
    head: int,
    routed: feed.Routed | None = None,
) -> _Key:
    labels = None if models is None else tuple(sorted(models))
    return (using, source_id, since, limit, labels, head, routed)


def _join(key: _Key) -> tuple[_Flight, bool]:
    """The flight of ``key`` and whether the caller leads it (reads the page)."""
    with _cache_lock:
        flight = _flights.get(key)
        if flight is not None and time.monotonic() - flight.started > CACHE_SECONDS:
            _forget(key)
            flight = None
        if flight is not None:
            _flights.move_to_end(key)
            counters["shared"] += 1
            return flight, False
        flight = _flights[key] = _Flight()
        counters["reads"] += 1
        return flight, True


def _lead(key: _Key, flight: _Flight, work: Callable[[], FeedPage]) -> FeedPage:
    """Read the page for everyone who joins ``flight``; a failure is nobody else's."""
    global _cached_bytes
    try:
        page = work()
    except BaseException:
        with _cache_lock:
            if _flights.get(key) is flight:
                del _flights[key]
            futures, flight.futures = flight.futures, []
            flight.done.set()
        _resolve_futures(futures)
        raise
    size = len(page.events_json)
    with _cache_lock:
        flight.page = page
        if _flights.get(key) is flight:
            if size > CACHE_BYTES:
                del _flights[key]
            else:
                _cached_bytes += size
                _evict()
        futures, flight.futures = flight.futures, []
        flight.done.set()
    _resolve_futures(futures)
    return page


def _evict() -> None:
    """Drop the least recently used pages beyond the cache's bounds (the lock is held)."""
    while len(_flights) > CACHE_PAGES or _cached_bytes > CACHE_BYTES:
        _forget(next(iter(_flights)))


def _forget(key: _Key) -> None:
    """Drop ``key``'s page from the cache (the lock is held); its flight goes on."""
    global _cached_bytes
    flight = _flights.pop(key)
    if flight.page is not None:
        _cached_bytes -= len(flight.page.events_json)


def _resolve_futures(futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    """Wake the tasks waiting for a read: one call into each event loop for all of its."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for loop, future in futures:
        by_loop.setdefault(loop, []).append(future)
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_done, waiting)
        except RuntimeError:  # its loop is closed: nobody waits there any more
            pass


def _set_done(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # a task that stopped waiting (its follower went away)
            future.set_result(None)


async def acached_read(
    using: str,
    source_id: str,
    since: int,
    limit: int,
    models: list[str] | None,
    head: int,
    routed: feed.Routed | None = None,
) -> FeedPage:
    """The page after ``since``, read once per process for everyone woken by ``head``
    who saw the outbox ``source_id``: only the reader uses a thread; the others wait
    on their loop."""
    key = _key(using, source_id, since, limit, models, head, routed)
    flight, leader = _join(key)
    if leader:
        reader = functools.partial(read, using, since, limit, models, source_id, routed)
        return await in_db_thread(_lead, key, flight, reader, lane="wake")
    if not flight.done.is_set():
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with _cache_lock:
            pending = not flight.done.is_set()
            if pending:
                flight.futures.append((loop, future))
        if pending:
            await future
    if flight.page is not None:
        return flight.page
    return await in_db_thread(read, using, since, limit, models, source_id, routed, lane="wake")


def cache_stats() -> dict[str, int]:
    with _cache_lock:
        return {**counters, "pages": len(_flights), "bytes": _cached_bytes}


# ---------------------------------------------------------------- the long-poll


async def aread_or_wait(
    since: int,
    limit: int,
    wait: float,
    *,
    using: str,
    models: list[str] | None = None,
    source_id: str = "",
    page: FeedPage | None = None,
    slots: WaitSlots | None = None,
    routed: feed.Routed | None = None,
) -> Outcome:
    """The page after ``since``, waiting up to ``wait`` seconds for one that is not empty.

    ``source_id``: the identity of the outbox as the caller saw it (pages read after a
    wake are shared among callers that saw the same one). ``page``: the first read,
    when the caller made it already. ``slots``: waiting takes one of them; none free,
    the empty page is answered at once (``refused``). Reads run in the pool's threads,
    outside any transaction (on MySQL a repeatable-read snapshot would hide the very
    events it waits for); the wait holds no thread.
    """
    deadline = time.monotonic() + max(0.0, wait)
    if page is None:
        page = await in_db_thread(read, using, since, limit, models, None, routed)
    if page.has_events or wait <= 0:
        return Outcome(page)
    if slots is not None and not slots.try_take():
        return Outcome(page, refused=True)
    try:
        floor = since
        while True:
            head = await notifier.await_head(using, floor, deadline - time.monotonic())
            if head is None:  # time is up; the page read last is the answer
                return Outcome(page)
            page = await acached_read(using, source_id, since, limit, models, head, routed)
            if page.has_events:
                return Outcome(page)
            # Woken by events of models this target does not receive: wait for later ones.
            floor = max(floor, head)
    finally:
        if slots is not None:
            slots.give_back()


# ---------------------------------------------------------------- the streamed feed


async def stream_pages(
    since: int,
    limit: int,
    duration: float,
    *,
    using: str,
    models: list[str] | None = None,
    source_id: str = "",
    page: FeedPage,
    routed: feed.Routed | None = None,
) -> AsyncIterator[FeedPage | None]:
    """The pages after ``since`` as they come, for ``duration`` seconds (CouchDB's
    ``feed=continuous``): ``page`` first (the request's first read, even empty), then
    each page with events as soon as the notifier sees them committed, each following
    the one before; None for a heartbeat after ``HEARTBEAT`` seconds without one.

    One request then costs nothing per event but its share of one read: followers
    streaming from the same position (all that are caught up) share each read after a
    wake, and its encoded line. CursorExpired when pruning overtakes the stream.
    """
    deadline = time.monotonic() + max(0.0, duration)
    yield page
    sent = time.monotonic()  # the last line
    floor = since = page.last_seq if page.has_events else since
    more = page.more
    while True:
        now = time.monotonic()
        if now >= deadline:
            return
        if now - sent >= HEARTBEAT:
            yield None
            sent = now
            continue
        if more:  # catching up: the next page at once, no wake needed
            page = await in_db_thread(read, using, since, limit, models, source_id, routed)
        else:
            timeout = min(sent + HEARTBEAT, deadline) - now
            head = await notifier.await_head(using, floor, timeout)
            if head is None:
                continue
            page = await acached_read(using, source_id, since, limit, models, head, routed)
            # Events of models this follower does not receive: wait for later ones
            # (the heartbeat still comes HEARTBEAT seconds after the last line).
            floor = max(floor, head)
        more = page.more
        if page.has_events:
            yield page
            sent = time.monotonic()
            since = page.last_seq
            floor = max(floor, since)
