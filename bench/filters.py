"""Serving filtered Targets (issue 14): snapshot pages and digests read for 10 Targets with
disjoint row filters against 1 unfiltered Target, and capture with filters saved or not.

    .venv-django6/bin/python bench/filters.py              # 100,000 Copy rows, 3 rounds, SQLite, PostgreSQL, MariaDB
    .venv-django6/bin/python bench/filters.py --quick      # 20,000 rows, 1 round: a smoke run
    .venv-django6/bin/python bench/filters.py --rows 200000 --rounds 5 --backends sqlite,postgres

Per backend, in one run:

1. a source database with ``--rows`` Copy rows (10 countries x 5 languages x rows/50
   keys, bench/pull.py's models and rows), served over HTTP by a threaded WSGI server in
   its own process, as bench/pull.py serves it; Targets: ``all`` (no filters) and
   ``only-c0`` ... ``only-c9``, each the rows of one country (Country by ``code__in``,
   Language by ``country__code__in``, Copy through the parent path
   ``language__country__code__in``): disjoint, together every row;
2. a full snapshot read per Target through the real views (``snapshot/`` start, then
   every model's pages of ``--page`` rows, 5,000 as a pull asks, each request signed
   with the Target's secret by the pull's SourceClient): rows/s per Target, p50 and p99
   of a Copy page's answer, and the server process's CPU per 100,000 rows served;
3. a full digest pass of the Copy rows per Target (as a re-pull asks: ``digest`` with
   one bucket per 8 rows, 500,000 rows per request): seconds and rows/s;
4. capture: ``--saves`` registered ``save()`` calls (updates of Copy rows, autocommit)
   in this process, with the 10 filtered Targets saved in the database and without
   them (deleted), alternating; microseconds per save and their ratio.

Each round reads the unfiltered Target and the ten filtered ones in alternating order
(``all`` first in even rounds, last in odd ones) so that load drifting during the run
favours neither; figures are medians over the rounds (per-Target rows/s over Targets
and rounds; page latencies over every page). The git commit measured and the load
average are printed. Every read is checked: each filtered Target gets exactly its
country's rows, the ten together every row.

Databases: SQLite files in a temporary directory; ``bench_filters_<pid>`` on the
PostgreSQL server of bench/pg.py (``CFS_BENCH_PG=0`` leaves it out) and on the MariaDB
server of the test suite (``CFS_MARIADB_*``, ``CFS_BENCH_MARIADB=0`` leaves it out);
all removed at exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import pg, pull  # noqa: E402

N_FILTERED = pull.N_COUNTRIES  # one filtered Target per country
SECRET = "bench-secret"
ROWS_PER_BUCKET = 8  # as target/pull/digests.py
DIGEST_LIMIT = 500_000  # rows per digest request: 100 pages of 5,000, as a re-pull asks
NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL", "mysql": "MariaDB"}


# ------------------------------------------------------------------ databases and settings


def mariadb_server() -> dict[str, Any]:
    from tests import dbs

    config = dbs.mariadb_config()
    return {k: config[k] for k in ("HOST", "PORT", "USER", "PASSWORD")}


def mariadb_admin(sql: str) -> None:
    from tests import dbs

    dbs.ensure_mysql_driver()
    import MySQLdb

    server = mariadb_server()
    conn = MySQLdb.connect(host=server["HOST"], port=int(server["PORT"]), user=server["USER"],
                           password=server["PASSWORD"], connect_timeout=5)  # fmt: skip
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def mariadb_unavailable() -> str:
    if os.environ.get("CFS_BENCH_MARIADB", "1").strip().lower() in {"0", "false", "no"}:
        return "disabled by CFS_BENCH_MARIADB=0"
    try:
        mariadb_admin("SELECT 1")
    except Exception as exc:  # any failure means "not usable"
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return ""


def database(spec: str) -> dict[str, Any]:
    """``sqlite:PATH``, ``postgres:DBNAME`` or ``mysql:DBNAME`` -> a DATABASES entry."""
    kind, _, name = spec.partition(":")
    if kind == "mysql":
        from tests import dbs

        dbs.ensure_mysql_driver()
        return {"ENGINE": "django.db.backends.mysql", "NAME": name, **mariadb_server(),
                "OPTIONS": {"charset": "utf8mb4", "isolation_level": "read committed"}}  # fmt: skip
    return pull.database(spec)


def configure(databases: dict[str, str]) -> None:
    """Django settings for one process of the bench, then bench/pull.py's models."""
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,  # DEBUG would keep every query in memory
        SECRET_KEY="changefeed-sync-bench-not-a-secret",
        USE_TZ=True,
        TIME_ZONE="UTC",
        ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF="changefeed_sync.urls",
        MIDDLEWARE=[],
        INSTALLED_APPS=["django.contrib.contenttypes", "changefeed_sync", "bench.pull.BenchConfig"],
        DATABASES={alias: database(spec) for alias, spec in databases.items()},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    pull.register()


def filters_of(code: str) -> dict[str, dict[str, Any]]:
    return {
        "bench.country": {"code__in": [code]},
        "bench.language": {"country__code__in": [code]},
        "bench.copy": {"language__country__code__in": [code]},
    }


def filtered_targets() -> list[Any]:
    from changefeed_sync.models import Target

    return [
        Target(name=f"only-c{i}", secrets=SECRET, row_filters=filters_of(f"c{i}"))
        for i in range(N_FILTERED)
    ]


# ------------------------------------------------------------------ the server process


def role_serve(db: str) -> None:
    """A source site: ``changefeed_sync.urls`` at the root, threaded WSGI, quiet."""
    configure({"default": db})
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    def report_and_exit(signum: int, frame: Any) -> None:
        sys.stdout.write(json.dumps({"maxrss_kb": pull.peak_rss_kb()}) + "\n")
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, report_and_exit)
    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
    server.set_app(WSGIHandler())
    sys.stdout.write(f"{server.server_port}\n")
    sys.stdout.flush()
    server.serve_forever()


class Server(pull.Server):
    """bench/pull.py's server process, started by this script (it knows MariaDB)."""

    def __init__(self, db: str, logdir: Path) -> None:
        import select

        self.log = open(logdir / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--role", "serve", "--db", db],
            stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT,
        )  # fmt: skip
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else b""
        if not line.strip():
            self.process.kill()
            raise RuntimeError(f"source server did not start; see {logdir / 'server.log'}")
        self.url = f"http://127.0.0.1:{int(line)}/"


# ------------------------------------------------------------------ measurements


@dataclass
class Read:
    """One Target's full snapshot read, or its digest pass."""

    rows: int
    seconds: float
    cpu: float  # the server's
    pages: list[float] = field(default_factory=list)  # seconds of each Copy page


def client_for(name: str, url: str) -> Any:
    from changefeed_sync.models import DataSource
    from changefeed_sync.target.client import SourceClient

    return SourceClient(DataSource(name="bench", url=url, client_name=name, secrets=SECRET))


def snapshot_read(name: str, server: Server, page: int) -> Read:
    """Every row ``name`` reads: the start, then each model's pages, as a pull does."""
    client = client_for(name, server.url)
    cpu, t = server.cpu(), time.perf_counter()
    start = client.get_json("snapshot/", {}, timeout=300)
    rows, pages = 0, []
    for label in start["models"]:
        after = ""
        while True:
            p = time.perf_counter()
            got = client.get_json("snapshot/", {"model": label, "after": after, "limit": page},
                                  timeout=300)  # fmt: skip
            if label == "bench.copy":
                pages.append(time.perf_counter() - p)
                rows += len(got["rows"])
            after = got["next"]
            if not got["more"]:
                break
    seconds = time.perf_counter() - t
    if rows != start["counts"]["bench.copy"]:
        raise RuntimeError(f"{name}: {rows} rows read, {start['counts']['bench.copy']} counted")
    return Read(rows, seconds, server.cpu() - cpu, pages)


def digest_pass(name: str, server: Server, rows: int) -> Read:
    """The Copy rows' bucket digests of ``name``, as a re-pull compares them."""
    client = client_for(name, server.url)
    buckets = min(16_384, max(1, -(-rows // ROWS_PER_BUCKET)))
    cpu, t = server.cpu(), time.perf_counter()
    after = ""
    while True:
        got = client.get_json("snapshot/", {"model": "bench.copy", "after": after,
                                            "limit": DIGEST_LIMIT, "digest": buckets},
                              timeout=300)  # fmt: skip
        after = got["next"]
        if not got["more"]:
            break
    return Read(rows, time.perf_counter() - t, server.cpu() - cpu)


def capture_cost(alias: str, saves: int, rounds: int) -> tuple[list[float], list[float]]:
    """Microseconds per registered save() without and with the filtered Targets saved."""
    from django.db import connections

    from changefeed_sync.models import Target

    copy = pull.bench_models()["Copy"]
    total = copy.objects.using(alias).count()
    step = max(1, total // saves)
    rows = list(copy.objects.using(alias).order_by("pk")[::step][:saves])
    without: list[float] = []
    with_: list[float] = []
    for r in range(2 * rounds):
        filtered = (r % 4) in (1, 2)  # without, with, with, without, ...
        Target.objects.using(alias).filter(name__startswith="only-").delete()
        if filtered:
            Target.objects.using(alias).bulk_create(filtered_targets())
        time.sleep(1.1)  # past capture's one-second cache of the Targets
        t = time.perf_counter()
        for row in rows:
            row.value = f"saved {r} {row.pk}"
            row.save(using=alias)
        (with_ if filtered else without).append((time.perf_counter() - t) / len(rows) * 1e6)
    Target.objects.using(alias).filter(name__startswith="only-").delete()
    Target.objects.using(alias).bulk_create(filtered_targets())
    connections[alias].close()
    return without, with_


@dataclass
class Figures:
    backend: str
    rows: int
    full: list[Read] = field(default_factory=list)  # the unfiltered Target's reads
    parts: list[Read] = field(default_factory=list)  # every filtered Target's reads
    rounds_parts: list[float] = field(default_factory=list)  # seconds of the 10, per round
    full_digests: list[Read] = field(default_factory=list)
    part_digests: list[Read] = field(default_factory=list)
    save_without: list[float] = field(default_factory=list)
    save_with: list[float] = field(default_factory=list)


def bench_backend(backend: str, spec: str, rows: int, rounds: int, page: int, saves: int,
                  workdir: Path) -> Figures:  # fmt: skip
    from django.db import connections

    from changefeed_sync.models import Target

    alias = backend
    fig = Figures(backend, rows)
    pull.migrate(alias)
    t = time.perf_counter()
    pull.seed(alias, rows)
    Target.objects.using(alias).create(name="all", secrets=SECRET)
    Target.objects.using(alias).bulk_create(filtered_targets())
    print(f"  seeded {rows:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
    for each in connections:
        connections[each].close()
    server = Server(spec, workdir)
    names = [f"only-c{i}" for i in range(N_FILTERED)]
    try:
        for r in range(rounds):
            order = ["all", *names] if r % 2 == 0 else [*names, "all"]
            seconds = 0.0
            for name in order:
                read = snapshot_read(name, server, page)
                if name == "all":
                    fig.full.append(read)
                else:
                    fig.parts.append(read)
                    seconds += read.seconds
            fig.rounds_parts.append(seconds)
            got = [x.rows for x in fig.parts[-N_FILTERED:]]
            if sum(got) != fig.full[-1].rows or len(set(got)) != 1:
                raise RuntimeError(f"filtered reads {got} do not split {fig.full[-1].rows} rows")
            for name in order:
                n = fig.full[-1].rows if name == "all" else got[0]
                (fig.full_digests if name == "all" else fig.part_digests).append(
                    digest_pass(name, server, n)
                )
            print(f"  round {r + 1}: all {fig.full[-1].seconds:.2f} s, the 10 filtered "
                  f"{seconds:.2f} s; digests all {fig.full_digests[-1].seconds:.2f} s, "
                  f"the 10 {sum(d.seconds for d in fig.part_digests[-N_FILTERED:]):.2f} s",
                  flush=True)  # fmt: skip
    finally:
        server.stop()
    fig.save_without, fig.save_with = capture_cost(alias, saves, rounds)
    return fig


# ------------------------------------------------------------------ report


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def report(figs: Sequence[Figures], page: int) -> None:
    print(f"\nResults (medians; pages of {page:,} rows)\n")
    head = ("| database | reader | rows/s per Target | rows/s, the 10 together | page p50 | "
            "page p99 | source CPU per 100k rows | digest pass | digest rows/s |")  # fmt: skip
    print(head)
    print("|" + "---|" * 9)
    for f in figs:
        full_rate = statistics.median(x.rows / x.seconds for x in f.full)
        part_rate = statistics.median(x.rows / x.seconds for x in f.parts)
        together = statistics.median(f.rows / s for s in f.rounds_parts)
        full_pages = [p for x in f.full for p in x.pages]
        part_pages = [p for x in f.parts for p in x.pages]
        full_cpu = statistics.median(x.cpu / x.rows * 100_000 for x in f.full)
        part_cpu = statistics.median(
            sum(x.cpu for x in f.parts[i : i + N_FILTERED]) / f.rows * 100_000
            for i in range(0, len(f.parts), N_FILTERED)
        )
        fd = statistics.median(x.seconds for x in f.full_digests)
        pd = statistics.median(x.seconds for x in f.part_digests)
        name = NAMES[f.backend]
        print(f"| {name} | unfiltered (`all`) | {full_rate:,.0f} | | {pct(full_pages, .5) * 1e3:.0f} ms"
              f" | {pct(full_pages, .99) * 1e3:.0f} ms | {full_cpu:.2f} s | {fd * 1e3:.0f} ms "
              f"| {f.rows / fd:,.0f} |")  # fmt: skip
        print(f"| {name} | 10 filtered, one country each | {part_rate:,.0f} "
              f"({full_rate / part_rate:.2f}x slower) | {together:,.0f} ({full_rate / together:.2f}x) "
              f"| {pct(part_pages, .5) * 1e3:.0f} ms | {pct(part_pages, .99) * 1e3:.0f} ms "
              f"| {part_cpu:.2f} s ({part_cpu / full_cpu:.2f}x) | {pd * 1e3:.0f} ms each "
              f"| {f.part_digests[0].rows / pd:,.0f} ({f.rows / fd / (f.part_digests[0].rows / pd):.2f}x slower) |")  # fmt: skip
    print("\n| database | registered save(), no filtered Target | with 10 filtered Targets | ratio |")
    print("|---|---|---|---|")
    for f in figs:
        a, b = statistics.median(f.save_without), statistics.median(f.save_with)
        print(f"| {NAMES[f.backend]} | {a:,.0f} µs ({', '.join(f'{x:,.0f}' for x in f.save_without)})"
              f" | {b:,.0f} µs ({', '.join(f'{x:,.0f}' for x in f.save_with)}) | {b / a:.2f}x |")  # fmt: skip


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "serve"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=None, help="Copy rows (default 100,000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--page", type=int, default=5000, help="rows per snapshot page (5,000)")
    parser.add_argument("--saves", type=int, default=None, help="saves per capture sample (500)")
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 1 round, 200 saves")
    parser.add_argument("--backends", default="sqlite,postgres,mysql", help="sqlite,postgres,mysql")
    args = parser.parse_args(argv)
    if args.role == "serve":
        role_serve(args.db)
        return 0
    rows = args.rows or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 3)
    saves = args.saves or (200 if args.quick else 500)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend, why in (("postgres", pg.unavailable() if "postgres" in backends else ""),
                         ("mysql", mariadb_unavailable() if "mysql" in backends else "")):  # fmt: skip
        if why:
            print(f"{NAMES[backend]} left out: {why}")
            backends.remove(backend)
    workdir = Path(tempfile.mkdtemp(prefix="changefeed_sync-filters-bench-"))
    db_name = f"bench_filters_{os.getpid()}"
    specs = {"sqlite": f"sqlite:{workdir / 'source.sqlite3'}", "postgres": f"postgres:{db_name}",
             "mysql": f"mysql:{db_name}"}  # fmt: skip
    specs = {b: specs[b] for b in backends}
    figs = []
    try:
        if "postgres" in specs:
            pg.admin(f'DROP DATABASE IF EXISTS "{db_name}"')
            pg.admin(f'CREATE DATABASE "{db_name}"')
        if "mysql" in specs:
            mariadb_admin(f"DROP DATABASE IF EXISTS `{db_name}`")
            mariadb_admin(f"CREATE DATABASE `{db_name}` CHARACTER SET utf8mb4 "
                          "COLLATE utf8mb4_unicode_ci")  # fmt: skip
        import django

        configure({"default": next(iter(specs.values())), **specs})
        print(f"changefeed_sync filters bench: commit {git_commit()}, Python "
              f"{sys.version.split()[0]}, Django {django.get_version()}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.2f}; {rows:,} Copy rows, {rounds} rounds, "
              f"{saves} saves per capture sample", flush=True)  # fmt: skip
        for backend, spec in specs.items():
            print(f"\n[{NAMES[backend]}]", flush=True)
            figs.append(bench_backend(backend, spec, rows, rounds, args.page, saves, workdir))
        report(figs, args.page)
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    finally:
        try:
            from django.db import connections

            for alias in connections:
                connections[alias].close()
        except Exception:
            pass
        if "postgres" in specs:
            try:
                pg.admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            except Exception as exc:
                print(f"could not drop {db_name}: {exc}")
        if "mysql" in specs:
            try:
                mariadb_admin(f"DROP DATABASE IF EXISTS `{db_name}`")
            except Exception as exc:
                print(f"could not drop {db_name}: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # Run as the module bench.filters, beside bench.pull (whose app INSTALLED_APPS names).
    from bench.filters import main as module_main

    sys.exit(module_main())
