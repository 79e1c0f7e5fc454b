"""gcloud-tasks-emulator for the tests: its own virtualenv, a subprocess, a queue.

The emulator (PyPI ``gcloud-tasks-emulator``) pins ``protobuf<5`` while the project's
``google-cloud-tasks`` needs a newer one, so it lives in a virtualenv of its own:
``.venv-emulator/`` in the repository root, or ``CFS_EMULATOR_VENV``. It is created on
first use (about 40 s) under a file lock, so concurrent runs do not install it twice;
``.ci/run`` can create it ahead of the tests with::

    .venv/bin/python -m tests.emulator install

The project's real client reaches it over an insecure gRPC channel
(``CloudTasksGrpcTransport(channel=grpc.insecure_channel(host))``), which is what
``CHANGEFEED_SYNC_CLOUD_TASKS_EMULATOR_HOST`` makes ``changefeed_sync`` do. The emulator
really POSTs every HTTP-target task to its URL, retries a failed one about every 0.1 s
with no limit, and has none of Cloud Tasks' name deduplication nor its OIDC header.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Pinned: the tests rely on this version's behaviour (retries, no dedupe, log lines).
REQUIREMENT = "gcloud-tasks-emulator==0.6.2"
PROJECT = "changefeed-test"
LOCATION = "europe-west1"


class EmulatorUnavailable(RuntimeError):
    """The emulator could not be installed or started (the reason is the message)."""


def venv_dir() -> Path:
    configured = os.environ.get("CFS_EMULATOR_VENV", "").strip()
    return Path(configured) if configured else REPO_ROOT / ".venv-emulator"


def python(venv: Path | None = None) -> Path:
    """The emulator venv's interpreter (run as ``python -m gcloud_tasks_emulator``, so
    that the venv still works after the rename into place, unlike its scripts' #! lines)."""
    return (venv or venv_dir()) / "bin" / "python"


def _stamp(venv: Path) -> Path:
    return venv / ".installed"


def _complete(venv: Path) -> bool:
    try:
        return _stamp(venv).read_text(encoding="utf-8").strip() == REQUIREMENT
    except OSError:
        return False


def install(venv: Path | None = None, *, timeout: float = 600.0) -> Path:
    """Create the emulator's virtualenv if it is not complete yet; return its python.

    Built in a temporary directory beside the final one and renamed into place, so an
    interrupted install never leaves a half-made virtualenv that looks usable.
    """
    venv = venv or venv_dir()
    if _complete(venv):
        return python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # The lock lives outside the repository, so it never shows up in `git status`.
    digest = hashlib.sha256(str(venv.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"changefeed-sync-emulator-{digest}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be installing it right now
        if _complete(venv):
            return python(venv)
        building = venv.parent / f"{venv.name}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        try:
            # The base interpreter of this one (python -m venv from inside a venv makes
            # a fresh venv of the same Python, not a nested one).
            _run([sys.executable, "-m", "venv", str(building)], timeout=120)
            _run(
                [str(building / "bin" / "python"), "-m", "pip", "install", "-q",
                 "--disable-pip-version-check", REQUIREMENT],
                timeout=timeout,
            )
            _stamp(building).write_text(REQUIREMENT + "\n", encoding="utf-8")
            shutil.rmtree(venv, ignore_errors=True)
            building.rename(venv)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return python(venv)


def _run(args: list[str], *, timeout: float) -> None:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorUnavailable(f"{' '.join(args[:4])} ...: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise EmulatorUnavailable(
            f"{' '.join(args[:4])} ... exited with {result.returncode}:\n{tail}"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Emulator:
    """A running gcloud-tasks-emulator; its log (INFO) goes to ``log_path``."""

    def __init__(self, log_path: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # ------------------------------------------------------------------ process

    def start(self, timeout: float = 30.0) -> None:
        interpreter = install()
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            [str(interpreter), "-m", "gcloud_tasks_emulator", "start", f"--port={self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EmulatorUnavailable(
                    f"gcloud-tasks-emulator exited with {self.process.returncode}:\n{self.log()}"
                )
            # It binds [::]:PORT, which takes IPv4 too on a dual-stack loopback.
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                if "[SERVER] All services started" in self.log():
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise EmulatorUnavailable(
                    f"gcloud-tasks-emulator did not listen on {self.host} in {timeout} s:\n"
                    + self.log()
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not None and not self._log.closed:
            self._log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ API

    @property
    def client(self) -> Any:
        """The project's real ``google-cloud-tasks`` client, connected to this emulator."""
        if self._client is None:
            import grpc
            from google.cloud import tasks_v2
            from google.cloud.tasks_v2.services.cloud_tasks.transports import (
                CloudTasksGrpcTransport,
            )

            channel = grpc.insecure_channel(self.host)
            self._client = tasks_v2.CloudTasksClient(
                transport=CloudTasksGrpcTransport(channel=channel)
            )
        return self._client

    def queue_path(self, queue: str) -> str:
        return str(self.client.queue_path(PROJECT, LOCATION, queue))

    def create_queue(self, queue: str) -> str:
        path = self.queue_path(queue)
        self.client.create_queue(
            parent=f"projects/{PROJECT}/locations/{LOCATION}", queue={"name": path}
        )
        return path

    def tasks(self, queue: str) -> list[Any]:
        """Tasks still in the queue (the emulator drops a task once it answered 2xx)."""
        return list(self.client.list_tasks(parent=self.queue_path(queue)))

    def dispatches(self, task_id: str | None = None) -> list[str]:
        """Task names POSTed so far, one per attempt, in order (from the emulator's log)."""
        names = re.findall(r"\[TASKS\] Submitting task (\S+)", self.log())
        if task_id is None:
            return names
        return [n for n in names if n.rsplit("/", 1)[-1] == task_id]

    def failed_dispatches(self, task_id: str) -> int:
        """Attempts of ``task_id`` that got no 2xx (HTTP error or no connection)."""
        return len(re.findall(
            rf"\[TASKS\] Error submitting task \S+/tasks/{re.escape(task_id)}\b", self.log()
        ))

    def settings(self, queue: str) -> dict[str, Any]:
        """``override_settings`` keyword arguments that make changefeed_sync use this queue."""
        return {
            "CHANGEFEED_SYNC_DELIVERY_BACKEND": (
                "changefeed_sync.source.delivery.cloud_tasks.CloudTasksBackend"
            ),
            "CHANGEFEED_SYNC_CLOUD_TASKS_EMULATOR_HOST": self.host,
            "CHANGEFEED_SYNC_CLOUD_TASKS_PROJECT": PROJECT,
            "CHANGEFEED_SYNC_CLOUD_TASKS_LOCATION": LOCATION,
            "CHANGEFEED_SYNC_CLOUD_TASKS_QUEUE": queue,
            # The emulator sends no OIDC token: none is asked for.
            "CHANGEFEED_SYNC_CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL": "",
        }


@contextlib.contextmanager
def running(log_path: Path) -> Iterator[Emulator]:
    emulator = Emulator(log_path)
    try:
        emulator.start()
        yield emulator
    finally:
        emulator.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m tests.emulator install")
    print(install())
