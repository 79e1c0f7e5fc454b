"""The demo: two sites, a source and a target, kept in step by changefeed_sync.

Run by example_pair/run, with the virtualenv's Python. In order:

1. migrate both sites (each on its own database), create the admin user on both;
2. load the demo content on the source; create the Target there and the Data Source on
   the target, with a freshly generated shared secret;
3. start both servers (runserver on 127.0.0.1);
4. run a full Data Pull on the target (manage.py changefeed_pull source);
5. keep the target in step: `manage.py changefeed_sync source --follow` (long-poll) and/or
   webhook pushes from the source (--mode follow|push|both);
6. make an edit on the source every --interval seconds and print each one arriving on
   the target, until Ctrl-C (or, with --edits N, after N edits have arrived).

Every process it starts runs in a process group of its own, and all of them are stopped
(and waited for) on Ctrl-C, SIGTERM, an error or the end of a bounded run. Should this
process itself be killed, the kernel sends SIGTERM to its children (Linux).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

EXAMPLE_DIR = Path(__file__).resolve().parent
REPO_DIR = EXAMPLE_DIR.parent
SOURCE, TARGET = "source", "target"
ADMIN_USER = "admin"
#: The Data Source's name on the target, and the Target's name on the source.
SOURCE_NAME, TARGET_NAME = "source", "target"
ARRIVAL_TIMEOUT = 30.0


class Failed(Exception):
    """The demo cannot go on; the message says why."""


class Stopped(BaseException):
    """Ctrl-C or SIGTERM."""


def _on_signal(signum: int, frame: Any) -> None:
    raise Stopped


def _stamp() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except OSError:  # the terminal or pipe went away: keep stopping the children
        pass


# ---------------------------------------------------------------- processes


def _parent_death_signal() -> Any:
    """prctl(2), looked up before any child is forked (a forked child must not import)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _parent_death_signal()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Process:
    """A child in its own process group; stdout to a pipe (lines) or to its log file."""

    def __init__(
        self, name: str, args: Sequence[str], env: dict[str, str], log: Path, *, lines: bool
    ) -> None:
        self.name = name
        self.log = log
        self._log: IO[bytes] = open(log, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            list(args),
            cwd=REPO_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if lines else self._log,
            stderr=self._log,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
            return "\n".join("    " + line for line in text)
        return ""

    def read_lines(self, into: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
        """Forward the JSON lines of stdout to ``into`` (in a thread)."""

        def pump() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                with contextlib.suppress(ValueError):
                    into.put((self.name, json.loads(raw)))
            into.put((self.name, {"eof": True}))

        threading.Thread(target=pump, name=f"read-{self.name}", daemon=True).start()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the child's process group, wait; SIGKILL the group if it lingers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"  {self.name} did not stop within {timeout:.0f} s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


class Site:
    def __init__(self, role: str, port: int, database_url: str, env: dict[str, str]) -> None:
        self.role = role
        self.port = port
        self.database_url = database_url
        self.env = dict(env)
        if database_url:
            self.env["DATABASE_URL"] = database_url
        else:
            self.env.pop("DATABASE_URL", None)  # the site's own SQLite file

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def manage(self, *args: str) -> list[str]:
        return [sys.executable, str(EXAMPLE_DIR / self.role / "manage.py"), *args]

    def describe_database(self) -> str:
        if not self.database_url:
            return (
                f"SQLite {_relative(Path(self.env['EXAMPLE_PAIR_VAR']) / f'{self.role}.sqlite3')}"
            )
        scheme, _, rest = self.database_url.partition("://")
        return f"{scheme}://…{rest[rest.rfind('@') :] if '@' in rest else rest}"


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


class Pair:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.var = Path(os.environ.get("EXAMPLE_PAIR_VAR") or EXAMPLE_DIR / "var").resolve()
        self.logs = self.var / "logs"
        self.password = os.environ.get("EXAMPLE_PAIR_PASSWORD") or secrets.token_urlsafe(9)
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONIOENCODING="utf-8",
            EXAMPLE_PAIR_VAR=str(self.var),
            EXAMPLE_PAIR_PASSWORD=self.password,
            EXAMPLE_PAIR_SECRET=secrets.token_urlsafe(32),
        )
        env.pop("DJANGO_SETTINGS_MODULE", None)  # each manage.py names its own
        self.source = Site(
            SOURCE,
            pick_port(options.source_port, "--source-port"),
            os.environ.get("SOURCE_DATABASE_URL", ""),
            env,
        )
        self.target = Site(
            TARGET,
            pick_port(options.target_port, "--target-port"),
            os.environ.get("TARGET_DATABASE_URL", ""),
            env,
        )
        self.running: list[Process] = []
        self.lines: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    # ------------------------------------------------------------ steps

    def run(self) -> int:
        t0 = time.monotonic()
        if self.options.fresh:
            self.remove_sqlite_files()
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):
            old.unlink()  # this run's logs only
        say(f"source site: {self.source.describe_database()}, port {self.source.port}")
        say(f"target site: {self.target.describe_database()}, port {self.target.port}")
        for site in (self.source, self.target):
            if site.database_url:
                create_database(site.database_url)

        step("migrating both databases")
        self.together("migrate", [(site, ("migrate", "--noinput")) for site in self.sites])
        step("admin user, demo data, Target on the source, Data Source on the target")
        self.together(
            "setup",
            [
                (
                    self.source,
                    ("demo_setup", "--admin", ADMIN_USER, "--demo-data", "--target", TARGET_NAME),
                ),
                (
                    self.target,
                    (
                        "demo_setup",
                        "--admin",
                        ADMIN_USER,
                        "--data-source",
                        SOURCE_NAME,
                        "--url",
                        f"{self.source.url}sync/",
                        "--client-name",
                        TARGET_NAME,
                    ),
                ),
            ],
        )
        step("starting both servers")
        for site in self.sites:
            self.start(
                f"{site.role}-server",
                site.manage("runserver", f"127.0.0.1:{site.port}", "--noreload"),
                site,
            )
        for site in self.sites:
            self.wait_listening(site)
        step(f"full Data Pull on the target: manage.py changefeed_pull {SOURCE_NAME}")
        self.together("pull", [(self.target, ("changefeed_pull", SOURCE_NAME))], show=True)

        mode = self.options.mode
        if mode in ("follow", "both"):
            self.start(
                "follower",
                self.target.manage("changefeed_sync", SOURCE_NAME, "--follow"),
                self.target,
            )
        webhook = (
            f"{self.target.url}sync/webhook/{SOURCE_NAME}/" if mode in ("push", "both") else ""
        )
        self.start("watch", self.target.manage("demo_watch"), self.target, lines=True)
        self.expect_line("watch", "ready", timeout=30.0)
        self.banner(webhook, time.monotonic() - t0)

        edits = [
            "demo_edits",
            "--interval",
            str(self.options.interval),
            "--target",
            TARGET_NAME,
            "--webhook-url",
            webhook,
        ]
        if self.options.edits:
            edits += ["--count", str(self.options.edits)]
        self.start("edits", self.source.manage(*edits), self.source, lines=True)
        return self.follow_edits()

    @property
    def sites(self) -> tuple[Site, Site]:
        return (self.source, self.target)

    def remove_sqlite_files(self) -> None:
        """--fresh: the SQLite files and media of both sites (server databases are kept)."""
        for site in self.sites:
            if not site.database_url:
                for suffix in ("", "-journal", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        (self.var / f"{site.role}.sqlite3{suffix}").unlink()
            shutil.rmtree(self.var / f"{site.role}-media", ignore_errors=True)
        say("--fresh: starting from empty SQLite databases and media folders")

    def start(self, name: str, args: list[str], site: Site, *, lines: bool = False) -> Process:
        process = Process(name, args, site.env, self.logs / f"{name}.log", lines=lines)
        self.running.append(process)
        if lines:
            process.read_lines(self.lines)
        return process

    def together(
        self, what: str, commands: list[tuple[Site, tuple[str, ...]]], show: bool = False
    ) -> None:
        """Run manage.py commands at the same time; fail with their output if one fails."""
        processes = []
        for site, args in commands:
            log = self.logs / f"{site.role}-{what}.log"
            log.unlink(missing_ok=True)
            processes.append(
                (
                    site,
                    Process(
                        f"{site.role} {args[0]}", site.manage(*args), site.env, log, lines=False
                    ),
                )
            )
        self.running.extend(process for _, process in processes)
        for site, process in processes:
            while process.alive():
                time.sleep(0.05)
            self.running.remove(process)
            process.stop()
            if process.process.returncode != 0:
                raise Failed(
                    f"{process.name} on the {site.role} site failed "
                    f"(exit status {process.process.returncode}):\n{process.tail(25)}"
                )
            if show:
                say(process.tail(25))

    def wait_listening(self, site: Site, timeout: float = 30.0) -> None:
        server = next(p for p in self.running if p.name == f"{site.role}-server")
        deadline = time.monotonic() + timeout
        while True:
            if not server.alive():
                raise Failed(f"the {site.role} server exited:\n{server.tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", site.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                raise Failed(f"the {site.role} server is not listening after {timeout:.0f} s")
            time.sleep(0.05)

    def expect_line(self, name: str, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                who, message = self.lines.get(timeout=0.1)
            except queue.Empty:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise Failed(f"{name} printed nothing within {timeout:.0f} s") from None
                continue
            if who == name and key in message:
                return message

    def check_alive(self, except_: Sequence[str] = ()) -> None:
        for process in self.running:
            if process.name not in except_ and not process.alive():
                raise Failed(
                    f"{process.name} exited unexpectedly (exit status "
                    f"{process.process.returncode}); its log, {_relative(process.log)}:\n"
                    f"{process.tail()}"
                )

    def banner(self, webhook: str, seconds: float) -> None:
        mode = self.options.mode
        ways = []
        if mode in ("follow", "both"):
            ways.append(
                f"the target follows the feed: manage.py changefeed_sync {SOURCE_NAME} "
                "--follow (long-poll)"
            )
        if mode in ("push", "both"):
            ways.append(f"the source pushes each change to {webhook}")
        say()
        say("=" * 78)
        say(f"example_pair is running (set up in {seconds:.0f} s)")
        say(f"  source admin   {self.source.url}admin/        edits are made here")
        say(f"  target admin   {self.target.url}admin/        changes arrive here")
        say(f"  login          {ADMIN_USER} / {self.password}   (on both sites)")
        say(f"  data pulls     {self.target.url}admin/changefeed_sync/datapull/")
        say(f"  outbox         {self.source.url}admin/changefeed_sync/event/")
        for way in ways:
            say(f"  sync           {way}")
        say(f"  logs           {_relative(self.logs)}/")
        if self.options.edits:
            say(
                f"Making {self.options.edits} edits on the source, one every "
                f"{self.options.interval:g} s."
            )
        else:
            say(
                f"Making an edit on the source every {self.options.interval:g} s; "
                "Ctrl-C stops everything."
            )
        say("=" * 78)

    # ------------------------------------------------------------ the stream of edits

    def follow_edits(self) -> int:
        arrivals = Arrivals()
        edits_done = False
        while True:
            try:
                who, message = self.lines.get(timeout=0.2)
            except queue.Empty:
                who, message = "", {}
            if who == "edits" and "n" in message:
                for line in arrivals.edit(message):
                    say(line)
            elif who == "edits" and "done" in message:
                edits_done = True
            elif who == "watch" and "key" in message:
                for line in arrivals.seen(message):
                    say(line)
            late = arrivals.late(time.time())
            if late is not None:
                raise Failed(
                    f"edit {late['n']} has not reached the target after "
                    f"{ARRIVAL_TIMEOUT:.0f} s: {late['model']} {late['key']}"
                )
            if edits_done and not arrivals.pending:
                say(f"All {arrivals.made} edits arrived on the target.")
                return 0
            self.check_alive(except_=("edits",) if edits_done else ())

    # ------------------------------------------------------------ stopping

    def stop_all(self) -> None:
        if not self.running:
            return
        say("stopping: " + ", ".join(p.name for p in reversed(self.running)))
        for process in reversed(self.running):
            # The follower stops cleanly on SIGINT (the page being applied rolls back).
            process.stop(signal.SIGINT if process.name == "follower" else signal.SIGTERM)
        self.running.clear()
        say("stopped; nothing left running")


class Arrivals:
    """Edits made on the source matched with the changes the target's watcher saw.

    The two come from two processes through one queue, in either order: the target
    may report a change before the source's process has reported making it (a fast
    follower, a busy machine). So the last state seen of every row is kept, and an
    edit reported after its row already reached that state has arrived.
    """

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []  # expectations not yet seen on the target
        self.latest: dict[str, dict[str, Any]] = {}  # row -> the last change seen of it
        self.made = 0

    def edit(self, message: dict[str, Any]) -> list[str]:
        """An edit the source made: what to say."""
        self.made += 1
        lines = [f"{_stamp()}  source  edit {message['n']:>3}  {message['text']}"]
        for expect in message["expect"]:
            expect = {**expect, "n": message["n"], "t": message["t"]}
            seen = self.latest.get(_row(expect))
            if seen is not None and _satisfies(seen, expect):
                lines.append(self._arrived(seen, expect))
                self._drop_earlier(expect)
            else:
                self.pending.append(expect)
        return lines

    def seen(self, message: dict[str, Any]) -> list[str]:
        """A change the target's watcher saw: what to say."""
        self.latest[_row(message)] = message
        done = [e for e in self.pending if _satisfies(message, e)]
        if not done:
            return [f"{_stamp()}  target  changed     {_describe(message)}"]
        last = max(done, key=lambda e: e["n"])
        self._drop_earlier(last)
        return [self._arrived(message, last)]

    def _drop_earlier(self, arrived: dict[str, Any]) -> None:
        """An earlier edit of the same row counts as arrived once a later one did."""
        self.pending = [
            e for e in self.pending if not (_row(e) == _row(arrived) and e["n"] <= arrived["n"])
        ]

    def late(self, now: float) -> dict[str, Any] | None:
        """The first expectation still missing after ARRIVAL_TIMEOUT seconds, if any."""
        return next((e for e in self.pending if now - e["t"] > ARRIVAL_TIMEOUT), None)

    @staticmethod
    def _arrived(seen: dict[str, Any], expect: dict[str, Any]) -> str:
        lag = seen["t"] - expect["t"]
        return (
            f"{_stamp()}  target  edit {expect['n']:>3}  {_describe(seen)}"
            f"   (+{max(lag, 0):.2f} s)"
        )


def _row(change: dict[str, Any]) -> str:
    return json.dumps([change["model"], change["key"]])


def _satisfies(seen: dict[str, Any], expect: dict[str, Any]) -> bool:
    if seen["model"] != expect["model"] or seen["key"] != expect["key"]:
        return False
    if expect.get("deleted"):
        return bool(seen.get("deleted"))
    data = seen.get("data") or {}
    return all(data.get(name) == value for name, value in expect["data"].items())


def _describe(seen: dict[str, Any]) -> str:
    model = seen["model"].split(".", 1)[1].capitalize()
    key = "/".join(seen["key"])
    if seen.get("deleted"):
        return f"{model} {key} deleted"
    return f"{model} {key}: " + ", ".join(f"{k} = {v!r}" for k, v in seen["data"].items())


def step(text: str) -> None:
    say(f"==> {text}")


def pick_port(port: int, option: str) -> int:
    """``port``, checked to be free on 127.0.0.1; 0 picks a free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As runserver binds: a port whose last connections are in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise Failed(
                f"port {port} on 127.0.0.1 is in use (another example_pair still running?); "
                f"choose another with {option} PORT, or 0 for any free port"
            ) from None
        return int(sock.getsockname()[1])


def create_database(url: str) -> None:
    """Create the database a postgres:// or mysql:// URL names, if it does not exist."""
    sys.path.insert(0, str(EXAMPLE_DIR))
    from common_settings import parse_database_url

    config = parse_database_url(url)
    name = config["NAME"]
    if config["ENGINE"].endswith("postgresql"):
        import psycopg

        with psycopg.connect(
            host=config["HOST"],
            port=int(config["PORT"]),
            user=config["USER"] or None,
            password=config["PASSWORD"] or None,
            dbname="postgres",
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
                say(f"created PostgreSQL database {name}")
    elif config["ENGINE"].endswith("mysql"):
        import MySQLdb  # or PyMySQL, installed as MySQLdb by parse_database_url

        conn = MySQLdb.connect(
            host=config["HOST"],
            port=int(config["PORT"]),
            user=config["USER"],
            password=config["PASSWORD"],
            charset="utf8mb4",
            connect_timeout=5,
        )
        try:
            conn.cursor().execute(
                f"CREATE DATABASE IF NOT EXISTS `{name}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
        finally:
            conn.close()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="example_pair/run",
        description="Two Django sites kept in step by changefeed_sync: set up, start, "
        "and show edits on the source arriving on the target.",
    )
    parser.add_argument(
        "--mode",
        choices=["both", "follow", "push"],
        default=env("EXAMPLE_PAIR_MODE", "both"),
        help="how changes reach the target: the follower (long-poll), "
        "webhook pushes, or both (default) [$EXAMPLE_PAIR_MODE]",
    )
    parser.add_argument(
        "--edits",
        type=int,
        default=int(env("EXAMPLE_PAIR_EDITS", "0")),
        help="make this many edits, wait for them on the target, stop and "
        "exit 0; 0 (default): edit until Ctrl-C [$EXAMPLE_PAIR_EDITS]",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=float(env("EXAMPLE_PAIR_INTERVAL", "2")),
        help="seconds between edits (default 2) [$EXAMPLE_PAIR_INTERVAL]",
    )
    parser.add_argument(
        "--source-port",
        type=int,
        default=int(env("EXAMPLE_PAIR_SOURCE_PORT", "8001")),
        help="0: any free port (default 8001) [$EXAMPLE_PAIR_SOURCE_PORT]",
    )
    parser.add_argument(
        "--target-port",
        type=int,
        default=int(env("EXAMPLE_PAIR_TARGET_PORT", "8002")),
        help="0: any free port (default 8002) [$EXAMPLE_PAIR_TARGET_PORT]",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start from empty SQLite databases and media folders (otherwise the last "
        "run's data is kept and the demo content reloaded)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    pair: Pair | None = None
    try:
        pair = Pair(options)
        return pair.run()
    except Stopped:
        say()
        return 0
    except Failed as exc:
        say(f"example_pair: ERROR: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not leave half of the children running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if pair is not None:
            pair.stop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
