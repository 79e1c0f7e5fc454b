"""End-to-end lag: from a commit on the source to the row visible on the target.

    .venv-django6/bin/python bench/lag.py            # 1/s for 60 s and 100/s for 30 s, per mode
    .venv-django6/bin/python bench/lag.py --quick    # 1/s for 10 s and 100/s for 4 s
    .venv-django6/bin/python bench/lag.py --json PATH
    .venv-django6/bin/python bench/lag.py --modes inline --rates 100   # one case

Two sites of tests/servers.py, each its own SQLite database and ``runserver``
process (the source's serves the feed, the target's the webhook). This process is
the source application: it commits one new Tag per change at a fixed rate (open
loop: change i is due at start + i/rate, whatever the previous ones took), each in
its own transaction. Two ways to the target are measured, one after the other:

* inline webhooks: the source's default delivery backend POSTs the batch from a
  thread of this process right after the commit; the target's server applies it;
* the long-poll follower: ``manage.py changefeed_sync src --follow`` on the target
  (its own process) waits in a feed request that the source's server answers as
  soon as it sees the event (it looks for other processes' events every
  ``CHANGEFEED_SYNC_FEED_POLL_INTERVAL``, 20 ms by default).

Method. The commit time is taken by a ``transaction.on_commit`` callback registered
before the write, so it runs first once the commit is durable (before delivery is
even scheduled). Visibility is observed from outside both sites: a separate
watcher process (plain sqlite3, no Django) reads the target's database file every
millisecond on one open connection (``SELECT id, slug FROM testapp_tag WHERE id >
last``; each read is its own short read transaction, so it sees every commit of
the target's processes) and stamps each new row when it first sees it. Both stamps
are ``time.monotonic()``, which is the system-wide CLOCK_MONOTONIC on Linux, so
stamps of different processes compare. Lag = seen - committed; the polling adds
at most about 1 ms (0.5 ms on average) to it. The first few changes of each mode
are a warm-up and not counted (the delivery thread and the long-poll start).
Every change must arrive: a missing one stops the run ("benchmark self-check
failed") rather than print figures for lost work.

Targets (issue 4): p50 <= 50 ms and p99 <= 250 ms, at 1 and at 100 changes/s, for
both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import Background, Site  # noqa: E402

SECRET = "bench-lag-secret"
WARMUP = 5
P50_TARGET_MS = 50.0
P99_TARGET_MS = 250.0

#: The watcher: prints "<monotonic seconds> <slug>" for every new Tag on the target.
WATCHER = r"""
import sys, time
target = sys.argv[1]
if target.startswith("postgres"):
    import psycopg
    db = psycopg.connect(target, autocommit=True)
    query = "SELECT id, slug FROM testapp_tag WHERE id > %s ORDER BY id"
else:
    import sqlite3
    db = sqlite3.connect(target, timeout=30, isolation_level=None)
    query = "SELECT id, slug FROM testapp_tag WHERE id > ? ORDER BY id"
last = 0
print("ready", flush=True)
while True:
    rows = db.execute(query, (last,)).fetchall()
    if rows:
        now = time.monotonic()
        sys.stdout.write("".join(f"{now!r} {slug}\n" for _, slug in rows))
        sys.stdout.flush()
        last = rows[-1][0]
    time.sleep(0.001)
"""


class BenchError(RuntimeError):
    pass


@dataclass
class Result:
    mode: str
    rate: float
    changes: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def met(self) -> bool:
        return self.p50_ms <= P50_TARGET_MS and self.p99_ms <= P99_TARGET_MS


class Watcher:
    """The watcher process and a thread collecting its stamps."""

    def __init__(self, database: str) -> None:
        self.seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WATCHER, database],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise BenchError("the watcher did not start")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            stamp, slug = line.split()
            with self._lock:
                self.seen.setdefault(slug, float(stamp))

    def wait_for(self, slugs: list[str], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = [s for s in slugs if s not in self.seen]
                if not missing:
                    return {s: self.seen[s] for s in slugs}
            if time.monotonic() > deadline:
                raise BenchError(
                    f"benchmark self-check failed: {len(missing)} of {len(slugs)} changes never "
                    f"reached the target (first missing: {missing[0]})"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(5)


def commit_at_rate(prefix: str, rate: float, count: int) -> dict[str, float]:
    """Create ``count`` Tags, one transaction each, at ``rate`` per second; commit stamps."""
    from django.db import transaction

    from tests.testapp.models import Tag

    stamps: dict[str, float] = {}
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        slug = f"{prefix}-{i:06d}"
        with transaction.atomic():
            transaction.on_commit(lambda slug=slug: stamps.__setitem__(slug, time.monotonic()))
            Tag.objects.create(slug=slug)
    return stamps


def measure(mode: str, key: str, rate: float, seconds: float, watcher: Watcher) -> Result:
    # Warm-up at the same rate, not counted.
    warm = commit_at_rate(f"{key}{rate:g}-warm", rate, WARMUP)
    watcher.wait_for(list(warm), timeout=30)
    count = max(int(rate * seconds), 1)
    committed = commit_at_rate(f"{key}{rate:g}", rate, count)
    seen = watcher.wait_for(list(committed), timeout=30)
    lags = sorted((seen[s] - committed[s]) * 1000 for s in committed)
    p99 = statistics.quantiles(lags, n=100, method="inclusive")[98] if len(lags) > 1 else lags[0]
    return Result(
        mode=mode, rate=rate, changes=len(lags), p50_ms=statistics.median(lags),
        p99_ms=p99, max_ms=lags[-1], mean_ms=statistics.fmean(lags),
    )


def setup_django(source: Site) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.e2e_settings"
    os.environ["CFS_DATABASE_URL"] = source.database_url
    import django

    django.setup()


def use_wal(site: Site) -> None:
    """Switch the site's SQLite file to write-ahead logging (stored in the file itself)."""
    db = sqlite3.connect(site.sqlite_path)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        db.close()
    if mode != "wal":
        raise BenchError(f"could not switch {site.sqlite_path} to WAL (got {mode!r})")


def run(
    rates: list[float], seconds: dict[float, float], workdir: Path, *, backend: str = "sqlite",
    wal: bool = False, modes: tuple[str, ...] = ("inline", "follower"),
) -> list[Result]:
    source, target = Site("src", backend, workdir), Site("tgt", backend, workdir)
    watcher: Watcher | None = None
    follower: Background | None = None
    results: list[Result] = []
    try:
        for site in (source, target):
            site.create_database()
        migrations = [threading.Thread(target=site.migrate) for site in (source, target)]
        for thread in migrations:
            thread.start()
        for thread in migrations:
            thread.join()
        if wal and backend == "sqlite":
            use_wal(source)
            use_wal(target)
        source.start_server()
        target.start_server()
        target.run_python(f"""
            from changefeed_sync.models import DataSource
            DataSource.objects.create(name="src", url={source.url + "sync/"!r},
                                      client_name="tgt", secrets={SECRET!r})
        """)
        setup_django(source)
        from changefeed_sync.models import Target
        from changefeed_sync.source import push

        webhook = f"{target.url}sync/webhook/src/"
        Target.objects.create(name="tgt", secrets=SECRET, webhook_url=webhook)
        push.forget_targets()
        watcher = Watcher(
            str(target.sqlite_path) if backend == "sqlite" else target.database_url
        )

        for rate in rates if "inline" in modes else ():
            results.append(measure("inline webhook", "w", rate, seconds[rate], watcher))
            print_row(results[-1])
        if "follower" not in modes:
            return results

        # Follower: no more pushes; the target pulls with a long-poll instead.
        Target.objects.filter(name="tgt").update(webhook_url="")
        push.forget_targets()
        follower = target.start("changefeed_sync", "src", "--follow", name="follow")
        for rate in rates:
            results.append(measure("long-poll follower", "f", rate, seconds[rate], watcher))
            print_row(results[-1])
        if follower.poll() is not None:
            raise BenchError("the follower exited:\n" + follower.output())
    finally:
        if follower is not None:
            follower.stop()
        if watcher is not None:
            watcher.stop()
        for site in (source, target):
            site.close()
    return results


HEADER = (
    f"{'mode':<20} {'rate':>7} {'changes':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
    f"{'mean ms':>8}  target p50<={P50_TARGET_MS:.0f} p99<={P99_TARGET_MS:.0f}"
)


def print_row(r: Result) -> None:
    print(
        f"{r.mode:<20} {r.rate:>5.0f}/s {r.changes:>8} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} "
        f"{r.max_ms:>8.1f} {r.mean_ms:>8.1f}  {'met' if r.met else 'MISSED'}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--rates", default="1,100", help="changes per second, comma-separated")
    parser.add_argument("--seconds", type=float, help="seconds per rate (default: by rate)")
    parser.add_argument(
        "--modes", default="inline,follower",
        help="ways to the target to measure, comma-separated (default: inline,follower)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--backend", choices=["sqlite", "postgres"], default="sqlite",
        help="database of both sites (default: sqlite; postgres for comparison)",
    )
    parser.add_argument(
        "--wal", action="store_true",
        help="put both SQLite databases in WAL mode (default: SQLite's rollback journal)",
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    if args.seconds:
        seconds = {rate: args.seconds for rate in rates}
    elif args.quick:
        seconds = {rate: 10.0 if rate < 10 else 4.0 for rate in rates}
    else:
        seconds = {rate: 60.0 if rate < 10 else 30.0 for rate in rates}
    storage = (
        f"SQLite ({'WAL' if args.wal else 'rollback journal'})"
        if args.backend == "sqlite" else "PostgreSQL"
    )
    print(
        f"lag from commit on the source to the row visible on the target; two runserver "
        f"processes on {storage}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start; "
        + ", ".join(f"{rate:g}/s for {seconds[rate]:g} s" for rate in rates)
    )
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="changefeed_sync-lag-") as tmp:
        try:
            results = run(
                rates, seconds, Path(tmp), backend=args.backend, wal=args.wal,
                modes=tuple(args.modes.split(",")),
            )
        except BenchError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"met": r.met} for r in results], indent=2))
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine "
          "inflates the figures)")
    missed = [r for r in results if not r.met]
    print("all targets met" if not missed else f"{len(missed)} target(s) missed")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
