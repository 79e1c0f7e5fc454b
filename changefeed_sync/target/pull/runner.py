"""Running a recorded pull (a DataPull row) and watching its runner.

A running pull records its runner (host:pid) and, from a second thread with
its own connection, a heartbeat and its progress. A pull whose runner is gone
(its pid is dead on this host, or its heartbeat stopped) is marked failed with
the reason the next time pulls are listed or started.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta

from django.db import DatabaseError, connections
from django.utils import timezone

from ... import conf
from ...models import DataPull
from .progress import Progress, ProgressCallback
from .run import run_pull

# The name from before the pull became a package: sites' LOGGING settings may use it.
logger = logging.getLogger("changefeed_sync.pull")


def this_runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_state(runner: str) -> bool | None:
    """Whether the runner's process is alive: None when it cannot be told from here
    (another host, or not a POSIX system)."""
    host, _, pid_text = runner.rpartition(":")
    if host != socket.gethostname() or os.name != "posix" or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            if fh.read().rpartition(")")[2].split()[:1] == ["Z"]:
                return False
    except OSError:
        pass
    return True


def stale_reason(pull: DataPull, *, vendor: str, now: datetime | None = None) -> str:
    """Why a running pull is dead ("" if it is not, as far as can be told)."""
    now = now or timezone.now()
    last = pull.heartbeat_at or pull.started_at or pull.created_at
    runner = pull.runner or "unknown"
    alive = _pid_state(pull.runner)
    if alive is False:
        return f"runner {runner} stopped responding at {last.isoformat()} (its process is gone)"
    if alive and vendor == "sqlite":
        # The pull's transaction holds SQLite's write lock, so no heartbeat can be
        # written while it runs: a live process is all there is to go by.
        return ""
    if now - last > timedelta(seconds=conf.pull_stale_after()):
        return f"runner {runner} stopped responding at {last.isoformat()}"
    return ""


def fail_stale_pulls(using: str = "default") -> list[int]:
    """Mark running pulls whose runner is gone as failed; return their ids."""
    vendor = connections[using].vendor
    now = timezone.now()
    failed = []
    for pull in DataPull.objects.using(using).filter(status=DataPull.RUNNING):
        reason = stale_reason(pull, vendor=vendor, now=now)
        if not reason:
            continue
        # Only if nothing moved since it was read (the runner may just have beaten).
        marked = (
            DataPull.objects.using(using)
            .filter(pk=pull.pk, status=DataPull.RUNNING, heartbeat_at=pull.heartbeat_at)
            .update(status=DataPull.FAILED, finished_at=now, error=reason)
        )
        if marked:
            logger.warning("pull %s from %s: %s", pull.pk, pull.source_id, reason)
            failed.append(pull.pk)
    return failed


class _Heartbeat:
    """Writes a running pull's heartbeat and latest progress from its own thread and
    connection: the pull's own connection is inside its transaction, where nobody
    else would see them (and a failure would roll them back)."""

    def __init__(self, pull_pk: int, using: str) -> None:
        self.pull_pk = pull_pk
        self.using = using
        self.message = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # SQLite: the pull holds the only write lock, a heartbeat could not be written.
        if connections[using].vendor != "sqlite":
            self._thread = threading.Thread(
                target=self._run, name=f"changefeed-pull-{pull_pk}-heartbeat", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        interval = min(2.0, conf.pull_stale_after() / 4)
        written: str | None = None
        try:
            while not self._stop.wait(interval):
                message = self.message
                try:
                    DataPull.objects.using(self.using).filter(
                        pk=self.pull_pk, status=DataPull.RUNNING
                    ).update(
                        heartbeat_at=timezone.now(),
                        **({"progress": message[:200]} if message != written else {}),
                    )
                    written = message
                except DatabaseError:
                    logger.warning("pull %s: could not write its heartbeat", self.pull_pk)
        finally:
            connections[self.using].close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def execute(
    pull: DataPull, *, using: str | None = None, progress: ProgressCallback | None = None
) -> DataPull:
    """Run a DataPull row and record its outcome (outside the pull's transaction)."""
    using = using or pull._state.db or "default"
    fail_stale_pulls(using)
    if _claim(pull, using):
        _run(pull, using, progress)
    pull.refresh_from_db(using=using)
    return pull


def _claim(pull: DataPull, using: str) -> bool:
    """Mark the pull running under this runner; or failed, returning False, while
    another pull of the same source runs (two would write the same rows)."""
    rows = DataPull.objects.using(using).filter(pk=pull.pk)
    busy = (
        DataPull.objects.using(using)
        .filter(source_id=pull.source_id, status=DataPull.RUNNING)
        .exclude(pk=pull.pk)
        .first()
    )
    if busy is not None:
        rows.update(
            status=DataPull.FAILED,
            finished_at=timezone.now(),
            error=f"pull #{busy.pk} of the same source is still running (runner {busy.runner}); "
            "run this one again when it has finished",
        )
        return False
    now = timezone.now()
    rows.update(
        status=DataPull.RUNNING,
        started_at=now,
        heartbeat_at=now,
        runner=this_runner(),
        progress="starting",
        error="",
    )
    return True


def _run(pull: DataPull, using: str, progress: ProgressCallback | None) -> None:
    """Run the claimed pull with its heartbeat; record how it ended."""
    rows = DataPull.objects.using(using).filter(pk=pull.pk)
    heartbeat = _Heartbeat(pull.pk, using)
    last = ["done"]

    def report(p: Progress) -> None:
        heartbeat.message = last[0] = str(p)
        if progress is not None:
            progress(p)

    try:
        position, counts = run_pull(
            pull.source,
            using=using,
            dry_run=pull.dry_run,
            keep_missing=pull.keep_missing,
            allow_mass_delete=pull.allow_mass_delete,
            progress=report,
        )
    except BaseException as exc:
        heartbeat.stop()
        if isinstance(exc, Exception):
            logger.exception("pull %s from %s failed", pull.pk, pull.source)
        error = str(exc) or type(exc).__name__
        rows.update(status=DataPull.FAILED, finished_at=timezone.now(), error=error[:5000])
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: recorded, and still stop
    else:
        heartbeat.stop()
        done = last[0]
        rows.update(
            status=DataPull.SUCCEEDED,
            finished_at=timezone.now(),
            counts=counts,
            position=position,
            error="",
            progress=(f"preview, nothing written: {done}" if pull.dry_run else done)[:200],
        )


def start_in_background(pull_pk: int, using: str = "default") -> threading.Thread:
    """Run a pull in a thread of this process (the default when no task backend is set)."""

    def run() -> None:
        try:
            execute(DataPull.objects.using(using).get(pk=pull_pk), using=using)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=f"changefeed-pull-{pull_pk}", daemon=True)
    thread.start()
    return thread
