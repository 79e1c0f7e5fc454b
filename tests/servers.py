"""Standalone sites for the end-to-end tests: real processes, real databases, real HTTP.

A :class:`Site` is one Django project (``tests.e2e_settings``) with its own database,
named by ``CFS_DATABASE_URL``. Everything it does runs in a subprocess from the
repository root: ``migrate``, ``runserver``, ``changefeed_sync``, and small Python
scripts (:meth:`Site.run_python`). Scripts go to one long-lived Python process per site
with Django set up (:class:`Shell`, this module run as ``python -m tests.servers``), which
saves a second of interpreter and Django start-up per script on a 2-core machine; it
closes its database connections after every script, like a process that exits would.
The test process only reads a site's tables directly (:meth:`Site.query`) to poll for
changes cheaply.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

from tests import dbs

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS_MODULE = "tests.e2e_settings"

#: backend name -> alias in tests/settings.py (for tests.dbs.require_alias).
ALIAS_OF = {"sqlite": "default", "postgres": "postgres", "mariadb": "mariadb"}

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Call ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Background:
    """A long-running subprocess whose stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], logdir: Path, name: str) -> None:
        self.name = name
        self.stdout_path = logdir / f"{name}.out"
        self.stderr_path = logdir / f"{name}.err"
        self._stdout: IO[bytes] = open(self.stdout_path, "wb")  # closed in stop()
        self._stderr: IO[bytes] = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            list(args), cwd=REPO_ROOT, env=env, stdout=self._stdout, stderr=self._stderr
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """Both streams, for assertion messages."""
        return (
            f"--- {self.name} stdout ---\n{_tail(self.stdout_path)}\n"
            f"--- {self.name} stderr ---\n{_tail(self.stderr_path)}"
        )

    def wait_for_output(self, text: str, *, stream: str = "stderr", timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in one of the streams; fail if the process exits first."""
        read = self.stderr if stream == "stderr" else self.stdout

        def seen() -> str:
            content = read()
            if text in content:
                return content
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}) before printing {text!r}\n"
                    + self.output()
                )
            return ""

        return wait_until(seen, timeout=timeout, what=f"{text!r} from {self.name}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate, wait, kill if needed; close the log files. Safe to call twice."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        for stream in (self._stdout, self._stderr):
            if not stream.closed:
                stream.close()
        return self.process.returncode


class Shell:
    """A Python process with a site's Django set up, running the scripts it is sent.

    Protocol: one JSON string (the script) per line on its stdin; one JSON object per
    line on its stdout: ``{"ok": bool, "stdout": what the script printed, "error": ...}``.
    """

    def __init__(self, env: dict[str, str], logdir: Path, name: str) -> None:
        self.name = name
        self.stderr_path = logdir / f"{name}.err"
        self._stderr: IO[bytes] = open(self.stderr_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.servers"], cwd=REPO_ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )

    def run(self, code: str, *, timeout: float) -> str:
        """Run ``code``; return what it printed, or raise AssertionError with its traceback."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(code).encode() + b"\n")
        self.process.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.stop()
                raise AssertionError(f"{self.name}: script still running after {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise AssertionError(
                f"{self.name} exited ({self.process.returncode})\n{_tail(self.stderr_path)}"
            )
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(
                f"{self.name}: script failed\n--- script ---\n{code}\n"
                f"--- stdout ---\n{reply['stdout']}\n--- error ---\n{reply['error']}"
            )
        return str(reply["stdout"])

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # end of input: the loop ends
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        for stream in (self.process.stdin, self.process.stdout, self._stderr):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()


def _shell_main() -> None:
    """The loop of a :class:`Shell` process."""
    import django

    django.setup()
    from django.db import connections

    replies = sys.stdout
    sys.stdout = sys.stderr  # stray output must not break the protocol
    for line in sys.stdin:
        code = json.loads(line)
        printed = io.StringIO()
        reply: dict[str, Any]
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(code, "<script>", "exec"), {"json": json, "__name__": "__script__"})
            reply = {"ok": True, "stdout": printed.getvalue()}
        except Exception:
            reply = {"ok": False, "stdout": printed.getvalue(), "error": traceback.format_exc()}
        finally:
            # As if the script's process had exited: no transaction, lock or file kept open.
            connections.close_all()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class Site:
    """One standalone Django site: a database of ``backend`` and, when started, a server."""

    def __init__(self, role: str, backend: str, workdir: Path) -> None:
        if backend not in ALIAS_OF:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(ALIAS_OF)}")
        self.role = role
        self.backend = backend
        self.workdir = workdir
        # The pid keeps concurrent runs (other checkouts, other engineers) apart.
        self.db_name = f"cfs_e2e_{os.getpid()}_{role}"
        self.sqlite_path = workdir / f"{role}.sqlite3"
        self.port: int | None = None
        self.server: Background | None = None
        self._server_starts = 0
        self._shell: Shell | None = None

    def __repr__(self) -> str:
        return f"<Site {self.role} on {self.backend}>"

    # ------------------------------------------------------------------ database

    def _server_config(self) -> dict[str, Any]:
        if self.backend == "postgres":
            return dbs.postgres_config()
        return dbs.mariadb_config()

    @property
    def database_url(self) -> str:
        if self.backend == "sqlite":
            # sqlite:/// + an absolute path (which starts with "/").
            return f"sqlite:///{self.sqlite_path.resolve().as_posix()}"
        cfg = self._server_config()
        scheme = "postgres" if self.backend == "postgres" else "mysql"
        auth = quote(cfg["USER"], safe="")
        if cfg["PASSWORD"]:
            auth += ":" + quote(cfg["PASSWORD"], safe="")
        return f"{scheme}://{auth}@{cfg['HOST']}:{cfg['PORT']}/{self.db_name}"

    def _pg_connect(self, dbname: str) -> Any:
        import psycopg

        cfg = self._server_config()
        return psycopg.connect(
            host=cfg["HOST"], port=int(cfg["PORT"]), user=cfg["USER"],
            password=cfg["PASSWORD"] or None, dbname=dbname, autocommit=True,
            connect_timeout=5,
        )

    def _mysql_connect(self, database: str | None) -> Any:
        dbs.ensure_mysql_driver()
        import MySQLdb

        cfg = self._server_config()
        kwargs: dict[str, Any] = dict(
            host=cfg["HOST"], port=int(cfg["PORT"]), user=cfg["USER"],
            password=cfg["PASSWORD"], charset="utf8mb4", connect_timeout=5,
        )
        if database is not None:
            kwargs["database"] = database
        conn = MySQLdb.connect(**kwargs)
        conn.autocommit(True)
        return conn

    def create_database(self) -> None:
        """A fresh, empty database for this site (dropped first if a crashed run left it)."""
        if self.backend == "sqlite":
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{self.sqlite_path}{suffix}")
            return
        self.drop_database()
        if self.backend == "postgres":
            with self._pg_connect(self._server_config()["NAME"]) as conn:
                conn.execute(f'CREATE DATABASE "{self.db_name}"')
        else:
            conn = self._mysql_connect(None)
            try:
                conn.cursor().execute(
                    f"CREATE DATABASE `{self.db_name}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
            finally:
                conn.close()

    def drop_database(self) -> None:
        if self.backend == "sqlite":
            return
        if self.backend == "postgres":
            with self._pg_connect(self._server_config()["NAME"]) as conn:
                # FORCE: a server killed mid-request may leave a connection behind (PG >= 13).
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        else:
            conn = self._mysql_connect(None)
            try:
                conn.cursor().execute(f"DROP DATABASE IF EXISTS `{self.db_name}`")
            finally:
                conn.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one SQL statement on this site's database from the test process.

        Placeholders are ``%s`` on every backend. A new connection each time, so every
        call sees what other processes committed.
        """
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.sqlite_path, timeout=30)
            try:
                rows = conn.execute(sql.replace("%s", "?"), list(params)).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        if self.backend == "postgres":
            with self._pg_connect(self.db_name) as conn:
                cursor = conn.execute(sql, list(params))
                return list(cursor.fetchall()) if cursor.description else []
        conn = self._mysql_connect(self.db_name)
        try:
            cursor = conn.cursor()
            cursor.execute(sql, list(params))
            return list(cursor.fetchall()) if cursor.description else []
        finally:
            conn.close()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    # ------------------------------------------------------------------ processes

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE=SETTINGS_MODULE,
            CFS_DATABASE_URL=self.database_url,
            PYTHONUNBUFFERED="1",
        )
        return env

    def django_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "django", *args]

    def run_django(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``manage.py ARGS`` for this site; with ``check``, fail on a non-zero exit status."""
        result = subprocess.run(
            self.django_args(*args), cwd=REPO_ROOT, env=self.env(), capture_output=True,
            text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self!r}: manage.py {' '.join(args)} exited with {result.returncode}\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            )
        return result

    def start_shell(self) -> None:
        """Start this site's :class:`Shell` now (it needs no database yet)."""
        if self._shell is None:
            self._shell = Shell(self.env(), self.workdir, f"{self.role}-shell")

    def run_python(self, code: str, *, timeout: float = 60.0) -> Any:
        """Run ``code`` on this site (Django set up); return the JSON it printed last.

        ``json`` is available to the script. Prints nothing -> returns None.
        """
        self.start_shell()
        assert self._shell is not None
        printed = self._shell.run(textwrap.dedent(code), timeout=timeout)
        lines = printed.strip().splitlines()
        return json.loads(lines[-1]) if lines else None

    def close(self) -> None:
        """Stop every process of this site and drop its database."""
        self.stop_server()
        if self._shell is not None:
            self._shell.stop()
            self._shell = None
        self.drop_database()

    def start(self, *args: str, name: str) -> Background:
        """``manage.py ARGS`` in the background, output in files under the work dir."""
        return Background(self.django_args(*args), self.env(), self.workdir, f"{self.role}-{name}")

    def migrate(self) -> None:
        # tests.testapp has no migrations: --run-syncdb creates its tables.
        self.run_django("migrate", "--run-syncdb", "--noinput", "-v", "0", timeout=120)

    # ------------------------------------------------------------------ server

    @property
    def url(self) -> str:
        assert self.port is not None, f"{self!r} has no server"
        return f"http://127.0.0.1:{self.port}/"

    def start_server(self, timeout: float = 30.0) -> None:
        """``runserver`` (threaded, no autoreload) on 127.0.0.1; the same port on a restart."""
        assert self.server is None, f"{self!r}: server already running"
        if self.port is None:
            self.port = free_port()
        self._server_starts += 1
        server = self.start(
            "runserver", f"127.0.0.1:{self.port}", "--noreload",
            name=f"server-{self._server_starts}",
        )
        self.server = server
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                self.server = None
                server.stop()
                raise RuntimeError(
                    f"{self!r}: runserver exited with {server.process.returncode}\n"
                    + server.output()
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop_server()
                raise RuntimeError(
                    f"{self!r}: runserver did not listen on {self.port} within {timeout} s\n"
                    + server.output()
                )
            time.sleep(0.05)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


if __name__ == "__main__":
    _shell_main()
