"""Deliver from a small pool of threads of this process, right after commit (the default).

What a process runs, whatever the number of targets: ``CHANGEFEED_SYNC_DELIVERY_WORKERS``
delivery threads (4 by default, started on the first delivery) and one recorder
thread, so at most one database connection more than the workers per database
alias, each closed when its thread runs out of work; one ``requests.Session``
whose connections the threads share (kept alive per target host). The previous
design ran a thread per target and database plus a recorder thread per target,
each with its own connection: 100 targets made about 200 threads and connections
in every process. The price of a bounded pool: a target that answers slowly holds
a worker that long (up to ``CHANGEFEED_SYNC_DELIVERY_TIMEOUT``), and the time until
every target has an event grows as targets x answer time / workers. For many
distant targets, raise the workers (or deliver through Cloud Tasks).

A round: a worker takes every target woken since the last round (a commit wakes all
the database's pushed-to targets), reads their rows in one query, and reads the feed
once per position and model selection (``push.plan``): 100 targets waiting at the
same position cost one read and one encoding of the events, each body then signed
with its target's own secret. The targets' deliveries then queue as jobs, one per
target, which the workers POST. A target has at most one job queued or running, and
a job sends its batches in order, so deliveries to a target stay in order and one at
a time; a target woken meanwhile is planned again once its job ends. A failure
schedules the target's next round for the end of its backoff; a commit during the
backoff does not shorten it (the row's ``next_attempt_at`` is read again), "Retry
delivery now" does (it clears it).

A process that exits (a management command, a cron job, ``manage.py shell -c``) waits
at exit for up to ``CHANGEFEED_SYNC_DELIVERY_EXIT_WAIT`` seconds (5 by default) for the
deliveries it started and records them, then gives up and logs what it left: the
next commit of any process, the first request a restarted server serves, or
``manage.py changefeed_push`` delivers those (and what a process killed without
running its exit handlers, SIGKILL or an unhandled SIGTERM, left).
"""

from __future__ import annotations

import atexit
import http.cookiejar
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import requests
from django.db import connections
from requests.adapters import HTTPAdapter

from ... import conf
from ...models import Target
from .. import push
from ..sqlite_waits import prompt_lock_waits
from .base import DeliveryBackend

logger = logging.getLogger("changefeed_sync.push")

#: Per-host connection pools the shared session keeps (one per target host in use).
HOST_POOLS = 128
#: Seconds before a round that crashed (the database away, a bug) is tried again.
CRASH_RETRY = 5.0

Key = tuple[str, int]  # (database alias, target id)


def delivery_workers() -> int:
    return conf.delivery_workers()


def delivery_exit_wait() -> float:
    return conf.delivery_exit_wait()


def _alias(target: Target) -> str:
    return target._state.db or "default"


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Targets share the session: one target's cookies must not travel to another."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


def make_session(workers: int) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=HOST_POOLS, pool_maxsize=max(1, workers))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.cookies.set_policy(_NoCookies())
    return session


class SharedRecorder(push.Recorder):
    """Writes the workers' successful deliveries to the Target rows from one thread.

    Why off the delivery path: the row write needs a write lock. On SQLite that is the
    database's only one, which a source writing many changes per second holds most of
    the time; SQLite's busy handler retries by sleeping (up to 100 ms at a time), so
    the write could wait for seconds, and written by the worker it held up every
    delivery behind it. The worker posts the next batch at once and the rows catch up
    when the lock allows, with the highest position acknowledged so far: one UPDATE per
    database for every delivery to every target made meanwhile.

    ``delivered_seq`` still moves only to positions a target acknowledged. If the
    process dies before the write, the row is behind and the next delivery starts
    from it: the target applies only what it lacks. A failure is written after the
    successes still pending, under the same lock, so a late success never erases a
    failure (or its backoff).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the three dicts below
        self._writing = threading.Lock()  # one write at a time, in order
        self._pending: dict[Key, int] = {}  # acknowledged, its write not started
        self._unwritten: set[Key] = set()  # the row may not show the latest success yet
        self._acked: dict[Key, int] = {}  # highest position acknowledged to this process
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def loaded(self, target: Target) -> None:
        key = (_alias(target), target.pk)
        with self._lock:
            target.delivered_seq = max(target.delivered_seq, self._acked.get(key, 0))
            if key in self._unwritten:  # the latest outcome was a success
                target.failures = 0
                target.next_attempt_at = None

    def success(self, target: Target, last_seq: int, using: str) -> None:
        target.delivered_seq = max(target.delivered_seq, last_seq)
        target.failures = 0
        key = (using, target.pk)
        with self._lock:
            acked = self._acked[key] = max(self._acked.get(key, 0), last_seq)
            self._pending[key] = acked
            self._unwritten.add(key)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="changefeed-push-recorder", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def failure(self, target: Target, message: str, using: str) -> float:
        with self._writing:
            self._write_pending()
            return push.record_failure(target, message, using)

    def flush(self) -> None:
        """Write what is pending now (the recorder thread; a process about to stop)."""
        with self._writing:
            self._write_pending()

    def _write_pending(self) -> None:
        """Record the pending successes, one UPDATE per database; the caller holds
        ``_writing``."""
        with self._lock:
            pending, self._pending = self._pending, {}
        by_alias: dict[str, dict[int, int]] = {}
        for (using, pk), seq in pending.items():
            by_alias.setdefault(using, {})[pk] = seq
        written: list[Key] = []
        try:
            for using, acknowledged in by_alias.items():
                push.record_successes(acknowledged, using)
                written.extend((using, pk) for pk in acknowledged)
        except BaseException:
            with self._lock:
                for key, seq in pending.items():
                    if key not in written:  # else written; a later success supersedes it
                        self._pending.setdefault(key, seq)
            raise
        with self._lock:
            for key in written:
                if key not in self._pending:
                    self._unwritten.discard(key)

    def stop(self) -> None:
        """Write what is pending, then let the thread end."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # e.g. the database away: try again shortly
                logger.exception("recording deliveries failed")
                time.sleep(1.0)
                self._wake.set()
            finally:
                connections.close_all()


class _Stop:
    """What ``_next`` hands a worker when the pool stops."""


_STOP = _Stop()


@dataclass
class _Job:
    """One target's deliveries of a round, sent in order by one worker."""

    using: str
    plan: push.Plan

    @property
    def key(self) -> Key:
        return (self.using, self.plan.target.pk)


class _Pool:
    """The delivery threads of this process and what they have to do."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted: dict[str, set[int]] = {}  # woken, not planned yet, per database
        self._planning: set[str] = set()  # databases a worker plans for right now
        self._jobs: deque[_Job] = deque()
        self._busy: set[Key] = set()  # being planned, or a job queued or running
        self._again: set[Key] = set()  # woken while busy: planned again after
        self._deferred: dict[Key, float] = {}  # in backoff: when (monotonic) it is due
        self._threads: list[threading.Thread] = []
        self._size = 0
        self.recorder = SharedRecorder()
        self.session: requests.Session | None = None
        self._exit_hook = False
        self._stopping = False

    # ------------------------------------------------------------ scheduling

    def schedule(self, target_ids: list[int], using: str) -> None:
        with self._cond:
            wanted = self._wanted.setdefault(using, set())
            for target_id in target_ids:
                key = (using, target_id)
                self._deferred.pop(key, None)  # its row's backoff is read again
                if key in self._busy:
                    self._again.add(key)
                else:
                    wanted.add(target_id)
            self._start_threads()
            self._cond.notify_all()

    def _start_threads(self) -> None:
        """Up to the configured number of workers (the caller holds ``_cond``)."""
        alive = [t for t in self._threads if t.is_alive()]
        if len(alive) == len(self._threads) and alive and self._size:
            return
        self._size = max(1, delivery_workers())
        if self.session is None:
            self.session = make_session(self._size)
        if not self._exit_hook:
            atexit.register(self.drain_at_exit)
            self._exit_hook = True
        self._threads = alive
        while len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work,
                name=f"changefeed-push-worker-{len(self._threads) + 1}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _release(self, key: Key, *, again: bool = False, retry_in: float | None = None) -> None:
        """A target's round is over (the caller holds ``_cond``)."""
        self._busy.discard(key)
        if retry_in is not None:
            # A wake-up meanwhile reads the row's backoff again, which says the same,
            # unless "Retry delivery now" cleared it: so it is kept.
            self._deferred[key] = time.monotonic() + retry_in
        if again or key in self._again:
            self._again.discard(key)
            self._deferred.pop(key, None)
            self._wanted.setdefault(key[0], set()).add(key[1])
        self._cond.notify_all()

    def _next(self, wait: bool) -> _Job | tuple[str, set[int]] | None | _Stop:
        """The next job, or a database and the targets to plan for. With nothing to do:
        None, unless ``wait``, then wait for something (or a backoff's end)."""
        with self._cond:
            while True:
                if self._stopping:
                    return _STOP
                now = time.monotonic()
                for key, due in list(self._deferred.items()):
                    if due <= now:
                        del self._deferred[key]
                        if key in self._busy:
                            self._again.add(key)
                        else:
                            self._wanted.setdefault(key[0], set()).add(key[1])
                if self._jobs:
                    return self._jobs.popleft()
                for using, ids in self._wanted.items():
                    if ids and using not in self._planning:
                        self._planning.add(using)
                        self._wanted[using] = set()
                        self._busy.update((using, pk) for pk in ids)
                        return using, ids
                if not wait:
                    return None
                timeout = min(self._deferred.values()) - now if self._deferred else None
                self._cond.wait(timeout)

    def _work(self) -> None:
        holds_connections = False
        while True:
            task = self._next(wait=not holds_connections)
            if isinstance(task, _Stop):
                connections.close_all()
                return
            if task is None:
                # Out of work: no connection is held while waiting for more.
                connections.close_all()
                holds_connections = False
                continue
            holds_connections = True
            if isinstance(task, _Job):
                self._deliver(task)
            else:
                self._plan(*task)

    # ------------------------------------------------------------ the work

    def _plan(self, using: str, ids: set[int]) -> None:
        plans: dict[int, push.Plan] = {}
        later: dict[int, float] = {}
        try:
            with prompt_lock_waits(using):
                targets = list(Target.objects.using(using).filter(pk__in=ids))
                due = []
                for target in targets:
                    if not push.takes_deliveries(target):
                        continue
                    self.recorder.loaded(target)
                    wait = push.backoff_left(target)
                    if wait is None:
                        due.append(target)
                    else:
                        later[target.pk] = wait
                plans = push.plan(due, using)
        except Exception:  # the database away, a bug: logged, tried again later
            logger.exception("planning deliveries on %s crashed", using)
            connections.close_all()
            later = {pk: CRASH_RETRY for pk in ids}
            plans = {}
        with self._cond:
            self._planning.discard(using)
            for pk in ids:
                plan = plans.get(pk)
                if plan is not None:
                    self._jobs.append(_Job(using, plan))
                else:
                    self._release((using, pk), retry_in=later.get(pk))
            self._cond.notify_all()

    def _deliver(self, job: _Job) -> None:
        target = job.plan.target
        retry_in: float | None
        try:
            with prompt_lock_waits(job.using):
                retry_in = push.deliver(
                    target, job.plan.batches, job.using, self.session, self.recorder
                )
        except Exception:  # keep the worker alive; the error is logged
            logger.exception("delivery to target %s crashed", target.name)
            connections.close_all()
            retry_in = CRASH_RETRY
        with self._cond:
            self._release(job.key, again=retry_in is None and job.plan.more, retry_in=retry_in)

    # ------------------------------------------------------------ waiting

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the pool has nothing left to do but backoffs, at most ``timeout``
        seconds; the successes are then written. True if it got there in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._jobs or any(self._wanted.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
        self.recorder.flush()
        return True

    def drain_at_exit(self) -> None:
        """At interpreter exit: give the deliveries this process started a bounded
        time, record them, and say what is left."""
        try:
            if not self.wait_idle(max(0.0, delivery_exit_wait())):
                self.recorder.flush()  # what was acknowledged so far
        except Exception:
            logger.exception("recording deliveries at exit failed")
        with self._cond:
            left = sorted(self._busy | {(u, pk) for u, ids in self._wanted.items() for pk in ids})
            waiting = len(self._deferred)
        if left:
            logger.warning(
                "exiting with deliveries to %d target(s) unfinished (%s): the next commit, "
                "a restarted server's first request or `manage.py changefeed_push` sends them",
                len(left),
                ", ".join(f"{using}:{pk}" for using, pk in left[:20]),
            )
        if waiting:
            logger.info("exiting with %d target(s) waiting for their backoff", waiting)

    def stop(self, timeout: float = 10.0) -> None:
        """End the threads once their current work is done (tests; an embedding that
        shuts down): queued work is dropped, what was acknowledged is written."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        self.recorder.stop()

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's threads, locks and work are not the child's
        (its exit hook is: atexit's registry is copied)."""
        exit_hook = self._exit_hook
        self.__init__()  # type: ignore[misc]
        self._exit_hook = exit_hook


class InlineBackend(DeliveryBackend):
    """The default: runs in this process's pool of delivery threads, one connection each
    and no infrastructure; deliveries left when a process exits wait for a later one."""

    def schedule(self, target_ids: list[int], using: str) -> None:
        pool().schedule(target_ids, using)


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _Pool()
        return _pool


def _after_fork_in_child() -> None:
    global _pool, _pool_lock
    _pool_lock = threading.Lock()
    if _pool is not None:
        _pool.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
