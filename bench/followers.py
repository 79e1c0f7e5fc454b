"""Many waiting followers: what they cost a source served under ASGI and under WSGI.

    .venv-django6/bin/python bench/followers.py                # 200 followers, every server
    .venv-django6/bin/python bench/followers.py --quick        # 50 followers, shorter phases
    .venv-django6/bin/python bench/followers.py --servers asgi,wsgi --followers 200
    .venv-django6/bin/python bench/followers.py --servers asgi-stream,asgi
    .venv-django6/bin/python bench/followers.py --json PATH

One source site (tests/servers.py, the site of tests/longpoll_settings.py) on a fresh
PostgreSQL database, with ``--followers`` Targets, served in turn by:

* ``asgi``: uvicorn, 2 worker processes, ``changefeed_sync.asgi.feed_application``
  around Django's ASGI handler (the feed answered without middleware, README
  "Deploying"); the long-polls wait in the event loop;
* ``asgi-1w``: the same with 1 worker process (one notifier instead of two: half the
  idle cost, one core's worth of Python for the answers);
* ``asgi-stream``: as ``asgi``, the followers streaming (``stream=1``): one signed
  request per follower, then the pages as they commit, as newline-delimited JSON in a
  chunked body (an empty line, a heartbeat, after 5 s without one), until the source
  ends the stream after ``wait`` seconds; they ask again then;
* ``asgi-1w-stream``: the same with 1 worker process;
* ``asgi-stream-frozen``: as ``asgi-stream``, the site's asgi.py ending with
  ``gc.freeze()`` (README "Deploying"): the objects of Django's start-up are never
  scanned again by the garbage collector, whose full collections otherwise paused a
  worker for 70 to 100 ms every few seconds at 100 events/s;
* ``asgi-django``: uvicorn, 2 workers, with Django's ASGI handler for the feed too
  (every synchronous middleware and request signal in a thread of the request's);
* ``wsgi``: gunicorn, gthread workers, 3 processes x 4 threads, Django's WSGI
  handler: at most ``CHANGEFEED_SYNC_FEED_WSGI_WAITERS`` (2) long-polls wait per
  process, the other followers are answered at once and told to come back after
  ``CHANGEFEED_SYNC_FEED_WSGI_RETRY_AFTER`` (1 s), or later when a process refused
  more followers than it answers in a second (``views.REFUSED_PER_SECOND``, 10).

All with persistent database connections (``CONN_MAX_AGE`` 60), as a production
site has them. The followers are this process: one asyncio loop sending signed feed
requests (``wait=25``, tests/loadclient.py), one Target each, honouring
``retry_after``. Events are Tags written by another process (the site's shell), each
in its own transaction; the commit time is taken by a ``transaction.on_commit``
callback registered before the write; arrival times are ``time.monotonic()`` when a
follower has the whole answer, or, streaming, the chunk that ends the page's line
(CLOCK_MONOTONIC is system-wide, so they compare).

Phases per server, measured one after the other once every follower has asked:

1. idle: nothing changes for ``--idle`` seconds (10): CPU of the server's processes
   (master and workers, utime + stime from /proc), as % of one core (feed requests
   answered: long-polls, or streams that ended);
2. page: ``GET /admin/login/`` ``--pages`` times (100, 20 ms apart) while the
   followers wait: p50 / p99;
3. one event: ``--events`` events (15), 2 s apart: time from commit until all
   followers have it, p50 / p99 / max over the events;
4. lag: ``--rate`` writes/s (100) for ``--lag-seconds`` (10): for every event and
   follower, commit to arrival, p50 / p99.

Every event must reach every follower: a missing one stops the run ("benchmark
self-check failed"). Targets (issue 12): ordinary page p99 < 50 ms while 200 wait;
idle CPU < 10 % of a core; one event to all 200, p99 < 100 ms; lag at 100 writes/s,
p99 < 100 ms (judged for ``asgi`` and the streamed configurations). This process shares
the machine's cores with the servers and PostgreSQL: on 2 cores its own work (200
answers to read) is in every latency. It runs the phases with its cyclic garbage
collector off: one collection would pause all 200 followers at once (each real one is
a process of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import loadclient  # noqa: E402
from tests.servers import Background, Site, free_port  # noqa: E402

SECRET = "bench-followers-secret-Wq4Zt8Rk1Yp6Lc3Vn7Hd0Jm5Gs2Xb9"
WAIT = 25.0  # the followers' long-poll, as changefeed_sync --follow asks (FOLLOW_WAIT)
TARGETS = {"page_p99_ms": 50.0, "idle_cpu": 10.0, "all_p99_ms": 100.0, "lag_p99_ms": 100.0}


class BenchError(RuntimeError):
    pass


def _uvicorn(app: str, workers: int = 2) -> Callable[[int], list[str]]:
    return lambda port: [
        "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "1",
    ]  # fmt: skip


def _gunicorn(port: int) -> list[str]:
    return [
        "gunicorn", "tests.wsgi:application", "--bind", f"127.0.0.1:{port}",
        "--worker-class", "gthread", "--workers", "3", "--threads", "4", "--timeout", "60",
        "--graceful-timeout", "1", "--log-level", "warning",
    ]  # fmt: skip


class Server(NamedTuple):
    description: str
    command: Callable[[int], list[str]]  # port -> arguments of ``python -m``
    stream: bool = False  # the followers stream (stream=1) instead of long-polling
    #: The project's asgi.py ends with gc.freeze() (tests/asgi.py, CFS_GC_FREEZE).
    frozen: bool = False


SERVERS: dict[str, Server] = {
    "asgi": Server("uvicorn 2 workers, feed_application", _uvicorn("tests.asgi:feed_application")),
    "asgi-1w": Server(
        "uvicorn 1 worker, feed_application",
        _uvicorn("tests.asgi:feed_application", workers=1),
    ),
    "asgi-stream": Server(
        "uvicorn 2 workers, feed_application, followers streaming",
        _uvicorn("tests.asgi:feed_application"),
        stream=True,
    ),
    "asgi-1w-stream": Server(
        "uvicorn 1 worker, feed_application, followers streaming",
        _uvicorn("tests.asgi:feed_application", workers=1),
        stream=True,
    ),
    "asgi-stream-frozen": Server(
        "as asgi-stream, the project's asgi.py ending with gc.freeze()",
        _uvicorn("tests.asgi:feed_application"),
        stream=True,
        frozen=True,
    ),
    "asgi-django": Server(
        "uvicorn 2 workers, Django's handler", _uvicorn("tests.asgi:application")
    ),
    "wsgi": Server("gunicorn gthread 3x4, WSGI", _gunicorn),
}


@dataclass
class Result:
    server: str
    followers: int
    idle_cpu: float = 0.0  # % of one core
    threads: int = 0  # in the server's processes at the end of the idle phase
    rss_mb: float = 0.0
    page_p50_ms: float = 0.0
    page_p99_ms: float = 0.0
    all_p50_ms: float = 0.0
    all_p99_ms: float = 0.0
    all_max_ms: float = 0.0
    lag_p50_ms: float = 0.0
    lag_p99_ms: float = 0.0
    lag_events: int = 0
    requests_idle: int = 0  # feed requests answered (streams ended) during the idle phase
    cut: int = 0  # streams whose body ended before its end (the connection closed)
    client_cpu: float = 0.0  # this process (the followers), % of one core over phases 3 and 4
    notes: list[str] = field(default_factory=list)


def p99(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


# ---------------------------------------------------------------- server processes


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (field 3 on)."""
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def _tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [root], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        todo += children
    return found


def _cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _status(pids: Sequence[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


# ---------------------------------------------------------------- the run


class Bench:
    def __init__(self, site: Site, followers: int, args: argparse.Namespace) -> None:
        self.site = site
        self.count = followers
        self.args = args

    def commit(self, slug: str) -> float:
        """One Tag, written by the site's shell; the monotonic time of its commit."""
        stamp: float = self.site.run_python(f"""
            import time
            from django.db import transaction
            from tests.testapp.models import Tag
            stamps = []
            with transaction.atomic():
                transaction.on_commit(lambda: stamps.append(time.monotonic()))
                Tag.objects.create(slug={slug!r})
            print(json.dumps(stamps[0]))
        """)
        return stamp

    def write_at_rate(self, prefix: str, rate: float, seconds: float) -> dict[str, float]:
        """Tags at ``rate`` per second (open loop: write i is due at start + i/rate)."""
        stamps: dict[str, float] = self.site.run_python(
            f"""
            import time
            from django.db import transaction
            from tests.testapp.models import Tag
            stamps = {{}}
            start = time.monotonic()
            for i in range({int(rate * seconds)}):
                delay = start + i / {rate} - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                slug = f"{prefix}-{{i:06d}}"
                with transaction.atomic():
                    transaction.on_commit(lambda slug=slug: stamps.__setitem__(slug, time.monotonic()))
                    Tag.objects.create(slug=slug)
            print(json.dumps(stamps))
            """,
            timeout=seconds + 120,
        )
        return stamps

    def serve(self, name: str) -> tuple[Background, int]:
        port = free_port()
        env = self.site.env()
        env.update(DJANGO_SETTINGS_MODULE="tests.longpoll_settings", CFS_CONN_MAX_AGE="60")
        if SERVERS[name].frozen:
            env["CFS_GC_FREEZE"] = "1"
        server = Background(
            [sys.executable, "-m", *SERVERS[name].command(port)], env, self.site.workdir, name
        )
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise BenchError(f"{name} exited\n" + server.output())
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return server, port
            if time.monotonic() > deadline:
                server.stop()
                raise BenchError(f"{name} did not listen within 60 s\n" + server.output())
            time.sleep(0.1)

    def run(self, name: str) -> Result:
        server, port = self.serve(name)
        try:
            # Every worker started (uvicorn spawns them after listening).
            time.sleep(2.0)
            # The 200 followers live in this one process: a collection of its garbage
            # paused all of them at once, and every arrival in it was stamped late (lag
            # p99 460 to 970 ms streaming, 125 ms without). A real follower is a process
            # of its own; this one keeps nothing cyclic worth collecting for a run.
            gc.collect()
            gc.disable()
            try:
                return asyncio.run(self._measure(name, server, port))
            finally:
                gc.enable()
        finally:
            server.stop()

    async def _measure(self, name: str, server: Background, port: int) -> Result:
        args = self.args
        result = Result(server=name, followers=self.count)
        loop = asyncio.get_running_loop()
        stream = SERVERS[name].stream
        followers = [
            loadclient.Follower(port, f"f{i}", SECRET, wait=WAIT, keep_answers=False, stream=stream)
            for i in range(self.count)
        ]
        head: int = self.site.run_python(
            "from changefeed_sync.source import feed\nprint(json.dumps(feed.head('default')))"
        )
        for follower in followers:
            follower.since = head
        seen: list[dict[str, float]] = [{} for _ in followers]
        answered = [0]

        async def follow(i: int, stop: asyncio.Event) -> None:
            follower = followers[i]
            while not stop.is_set():
                answer = await follower.poll(timeout=WAIT + 120)
                answered[0] += 1
                result.cut += not answer.complete
                if answer.status != 200:
                    raise BenchError(f"{follower.name}: HTTP {answer.status} {answer.body[:200]!r}")
                retry_after = answer.json().get("retry_after") if answer.body else None
                if retry_after:
                    try:
                        await asyncio.wait_for(stop.wait(), retry_after)
                    except asyncio.TimeoutError:
                        pass

        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(follow(i, stop)) for i in range(self.count)]

        def check_tasks() -> None:
            """Raise if a follower failed; take in the events they received (a stream's
            as they come, while its request goes on)."""
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise BenchError(f"a follower failed: {task.exception()!r}")
            for follower, keys in zip(followers, seen):
                for received, event in follower.received:
                    keys.setdefault(event["key"][0], received)
                follower.received.clear()

        try:
            await asyncio.sleep(3.0)  # every follower asked (and, under ASGI, waits)
            check_tasks()
            pids = _tree(server.pid)

            # 1. idle
            print(f"    {name}: idle", flush=True)
            before_cpu, before_answers = _cpu_seconds(pids), answered[0]
            await asyncio.sleep(args.idle)
            result.idle_cpu = (_cpu_seconds(pids) - before_cpu) / args.idle * 100
            result.requests_idle = answered[0] - before_answers
            # Threads are started as needed: counted once the followers were served a while.
            result.threads = _status(pids, "Threads")
            result.rss_mb = _status(pids, "VmRSS") / 1024

            # 2. an ordinary page while they wait
            print(f"    {name}: page", flush=True)
            pages = []
            for _ in range(args.pages):
                answer = await loadclient.get(port, "/admin/login/", timeout=60)
                if answer.status != 200:
                    raise BenchError(f"/admin/login/ answered {answer.status}")
                pages.append(answer.seconds * 1000)
                await asyncio.sleep(0.02)
            result.page_p50_ms, result.page_p99_ms = statistics.median(pages), p99(pages)
            check_tasks()

            # 3. one event to every follower
            client_started, wall_started = time.process_time(), time.monotonic()
            print(f"    {name}: one event", flush=True)
            to_all = []
            for n in range(args.events):
                slug = f"{name}-one-{n}"
                committed = await loop.run_in_executor(None, self.commit, slug)
                arrivals = await self._arrivals(seen, slug, check_tasks)
                to_all.append((max(arrivals) - committed) * 1000)
                await asyncio.sleep(2.0)  # the followers ask again and settle
            result.all_p50_ms, result.all_p99_ms = statistics.median(to_all), p99(to_all)
            result.all_max_ms = max(to_all)

            # 4. lag under a steady write rate
            print(f"    {name}: lag", flush=True)
            stamps = await loop.run_in_executor(
                None, self.write_at_rate, f"{name}-lag", args.rate, args.lag_seconds
            )
            lags = []
            for slug, committed in stamps.items():
                arrivals = await self._arrivals(seen, slug, check_tasks)
                lags += [(arrival - committed) * 1000 for arrival in arrivals]
            result.lag_p50_ms, result.lag_p99_ms = statistics.median(lags), p99(lags)
            result.lag_events = len(stamps)
            result.client_cpu = (
                (time.process_time() - client_started) / (time.monotonic() - wall_started) * 100
            )
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if result.cut:
            result.notes.append(f"{result.cut} streams cut before their end")
        return result

    async def _arrivals(
        self, seen: list[dict[str, float]], slug: str, check: Callable[[], None]
    ) -> list[float]:
        deadline = time.monotonic() + 60
        while True:
            missing = [i for i, keys in enumerate(seen) if slug not in keys]
            if not missing:
                return [keys[slug] for keys in seen]
            if time.monotonic() > deadline:
                raise BenchError(
                    f"benchmark self-check failed: {len(missing)} followers never got {slug}"
                )
            check()
            await asyncio.sleep(0.005)


def table(results: list[Result]) -> str:
    rows = [
        ("idle CPU, % of one core", "idle_cpu", "{:.1f}", TARGETS["idle_cpu"]),
        ("feed requests answered while idle", "requests_idle", "{:.0f}", None),
        ("threads in the server's processes", "threads", "{:.0f}", None),
        ("memory of the server's processes, MB", "rss_mb", "{:.0f}", None),
        ("ordinary page p50, ms", "page_p50_ms", "{:.1f}", None),
        ("ordinary page p99, ms", "page_p99_ms", "{:.1f}", TARGETS["page_p99_ms"]),
        ("one event to all, p50, ms", "all_p50_ms", "{:.1f}", None),
        ("one event to all, p99, ms", "all_p99_ms", "{:.1f}", TARGETS["all_p99_ms"]),
        ("one event to all, max, ms", "all_max_ms", "{:.1f}", None),
        ("lag p50, ms", "lag_p50_ms", "{:.1f}", None),
        ("lag p99, ms", "lag_p99_ms", "{:.1f}", TARGETS["lag_p99_ms"]),
        ("the followers' own CPU (this process), %", "client_cpu", "{:.0f}", None),
    ]
    base = next((r for r in results if r.server == "asgi"), None)
    heads = [r.server for r in results]
    ratios = [r for r in results if base is not None and r is not base]
    # Judged against the targets: asgi, and the streamed configurations.
    judged = [r for r in results if r is base or SERVERS[r.server].stream]
    widths = [max(12, len(h)) for h in heads]
    ratio_widths = [max(17, len(r.server) + 5) for r in ratios]
    lines = [
        f"{'':40} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
        + "".join(f" {r.server + '/asgi':>{w}}" for r, w in zip(ratios, ratio_widths))
        + "  target"
    ]  # fmt: skip
    for label, key, fmt, target in rows:
        values = [getattr(r, key) for r in results]
        cells = " ".join(f"{fmt.format(v):>{w}}" for v, w in zip(values, widths))
        for other, width in zip(ratios, ratio_widths):
            assert base is not None
            mine, theirs = getattr(other, key), getattr(base, key)
            cells += f" {(f'{mine / theirs:.1f}x' if theirs else '-'):>{width}}"
        if target is not None and judged:
            verdicts = ", ".join(
                f"{r.server}: {'met' if getattr(r, key) < target else 'MISSED'}" for r in judged
            )
            cells += f"  < {target:g} ({verdicts})"
        lines.append(f"{label:40} {cells}")
    for result in results:
        for note in result.notes:
            lines.append(f"{result.server}: {note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 followers, short phases")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--followers", type=int)
    parser.add_argument("--idle", type=float, help="seconds of the idle phase (10)")
    parser.add_argument("--pages", type=int, help="ordinary page requests (100)")
    parser.add_argument("--events", type=int, help="single events (15)")
    parser.add_argument("--rate", type=float, default=100.0, help="writes/s of the lag phase")
    parser.add_argument("--lag-seconds", type=float, help="seconds of the lag phase (10)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    args.followers = args.followers or (50 if quick else 200)
    args.idle = args.idle or (3.0 if quick else 10.0)
    args.pages = args.pages or (30 if quick else 100)
    args.events = args.events or (4 if quick else 15)
    args.lag_seconds = args.lag_seconds or (3.0 if quick else 10.0)
    servers = args.servers.split(",")
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; known: {', '.join(SERVERS)}")

    from bench import pg

    why = pg.unavailable()
    if why:
        print(f"PostgreSQL is needed: {why}", file=sys.stderr)
        return 2
    print(
        f"{args.followers} followers long-polling or streaming (wait={WAIT:g}) a source "
        "on PostgreSQL; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    for name in servers:
        print(f"  {name}: {SERVERS[name].description}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="changefeed_sync-followers-") as tmp:
        site = Site("followers", "postgres", Path(tmp))
        try:
            site.create_database()
            site.migrate()
            site.run_python(f"""
                from changefeed_sync.models import Target
                Target.objects.bulk_create(
                    [Target(name=f"f{{i}}", secrets={SECRET!r}) for i in range({args.followers})]
                )
            """)
            bench = Bench(site, args.followers, args)
            for name in servers:
                started = time.monotonic()
                results.append(bench.run(name))
                print(
                    f"  {name} measured in {time.monotonic() - started:.0f} s, load average "
                    f"{os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        except BenchError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        finally:
            site.close()
    print()
    print(table(results))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (other work on the machine "
          "inflates the figures)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
