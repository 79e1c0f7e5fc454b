"""Deliver from a thread of this process, right after commit (the default)."""

from __future__ import annotations

import logging
import threading
import time

from django.db import connections

from .. import push
from ..models import Target
from ..sqlite_waits import prompt_lock_waits

logger = logging.getLogger("changefeed_sync.push")


class _LateRecorder(push.Recorder):
    """Writes a worker's successful deliveries to its Target row from a thread of its own.

    Why: the row write needs a write lock. On SQLite that is the database's only
    one, which a source writing many changes per second holds most of the time;
    SQLite's busy handler retries by sleeping (up to 100 ms at a time), so the
    write could wait for seconds, and written by the worker it held up every
    delivery behind it. Now the worker posts the next batch at once and the row
    catches up when the lock allows, with the highest position acknowledged so
    far (one write for all the deliveries made meanwhile).

    ``delivered_seq`` still moves only to positions the target acknowledged. If
    the process dies before the write, the row is behind and the next delivery
    starts from it: the target applies only what it lacks. A failure is written
    after any success still pending, under the same lock, so a late success never
    erases a failure (or its backoff).
    """

    def __init__(self, target_id: int, using: str) -> None:
        self.target_id = target_id
        self.using = using
        self._lock = threading.Lock()  # guards the three fields below
        self._writing = threading.Lock()  # one write of the row at a time, in order
        self._pending: int | None = None  # acknowledged, its write not started
        self._unwritten = False  # the row may not show the latest success yet
        self._acked = 0  # highest position acknowledged to this process
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def loaded(self, target: Target) -> None:
        with self._lock:
            target.delivered_seq = max(target.delivered_seq, self._acked)
            if self._unwritten:  # the latest outcome was a success
                target.failures = 0
                target.next_attempt_at = None

    def success(self, target: Target, last_seq: int, using: str) -> None:
        target.delivered_seq = max(target.delivered_seq, last_seq)
        target.failures = 0
        with self._lock:
            self._acked = max(self._acked, last_seq)
            self._pending = self._acked
            self._unwritten = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run,
                    name=f"changefeed-push-record-{self.using}-{self.target_id}",
                    daemon=True,
                )
                self._thread.start()
        self._wake.set()

    def failure(self, target: Target, message: str, using: str) -> float:
        with self._writing:
            self._write_pending(target)
            return push.record_failure(target, message, using)

    def flush(self) -> None:
        """Write what is pending now (tests; a process about to stop)."""
        with self._writing:
            self._write_pending(Target(pk=self.target_id))

    def _write_pending(self, target: Target) -> None:
        """Record the pending success, if any; the caller holds ``_writing``."""
        with self._lock:
            seq, self._pending = self._pending, None
        if seq is None:
            return
        try:
            push.record_success(target, seq, self.using)
        except BaseException:
            with self._lock:
                if self._pending is None:  # else a later success supersedes it
                    self._pending = seq
            raise
        with self._lock:
            if self._pending is None:
                self._unwritten = False

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # e.g. the database away: try again shortly
                logger.exception("recording a delivery to target %s failed", self.target_id)
                time.sleep(1.0)
                self._wake.set()
            finally:
                connections.close_all()


class _Worker(threading.Thread):
    """One per target and database: keeps deliveries to a target in order."""

    def __init__(self, target_id: int, using: str) -> None:
        super().__init__(name=f"changefeed-push-{using}-{target_id}", daemon=True)
        self.target_id = target_id
        self.using = using
        self.wake = threading.Event()
        self.recorder = _LateRecorder(target_id, using)

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            try:
                with prompt_lock_waits(self.using):
                    retry_in = push.deliver_pending(
                        self.target_id, self.using, recorder=self.recorder
                    )
            except Exception:  # keep the worker alive; the error is logged
                logger.exception("delivery to target %s crashed", self.target_id)
                retry_in = 5.0
            finally:
                connections.close_all()
            if retry_in is not None:
                # Sleep through the backoff unless new events (or retry now) wake us.
                self.wake.wait(retry_in)
                self.wake.set()


class InlineBackend:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[tuple[str, int], _Worker] = {}

    def schedule(self, target_ids: list[int], using: str) -> None:
        for target_id in target_ids:
            with self._lock:
                worker = self._workers.get((using, target_id))
                if worker is None or not worker.is_alive():
                    worker = _Worker(target_id, using)
                    self._workers[(using, target_id)] = worker
                    worker.start()
            worker.wake.set()
