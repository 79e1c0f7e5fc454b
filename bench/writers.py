"""Capture under concurrency (issue 12 part 4): many writers of a registered model against
the same writers of an unregistered twin, side by side, on PostgreSQL, MariaDB and SQLite.

    .venv-django6/bin/python bench/writers.py                     # every database that answers
    .venv-django6/bin/python bench/writers.py --only postgresql   # or mysql, sqlite (repeatable)
    .venv-django6/bin/python bench/writers.py --seconds 5 --rounds 1 --threads 8   # shorter
    .venv-django6/bin/python bench/writers.py --only mysql --breakdown   # + where it goes

Measured per database, in one run:

1. ``--threads`` (16) writer threads, each with its own connection, each running
   transactions ``with atomic(): save(); sleep(0.020); save()`` (a view under
   ``ATOMIC_REQUESTS`` that does 20 ms of other work between two saves) for
   ``--seconds`` (10): committed transactions per second, registered model against
   the unregistered one, and their ratio. Issue target: registered/unregistered
   >= 0.9 on PostgreSQL and MariaDB.
2. The same with no other work between the saves: tx/s and ratio, reported only.
3. One thread, capture overhead: ``--saves`` (1,000) new rows per model, in
   transactions of 10 saves each, then as plain ``save()`` calls in autocommit;
   registered/unregistered time. Targets: <= 1.3x in ``atomic()``, <= 1.17x in
   autocommit (the issue says "no slower than 1.12-1.17x").
4. The outbox afterwards: every measurement reads the feed from the position it
   started at and must find exactly the events of the registered saves that
   committed (model, natural key and the value each save wrote, each once), and at
   the end the outbox must hold as many events as registered saves committed in the
   whole run. A measurement that fails this prints INVALID instead of a verdict and
   the run exits with status 1.

The two models are the test app's ``Country`` (registered, natural key ``code``) and
``Plain`` (the same two columns, never registered), the pair ``bench/run.py`` compares.
In parts 1 and 2 each thread updates a row of its own in both saves (so writers never
wait for each other's rows, only for what capture adds); each save writes a different
value, so every event can be told apart. Part 3 creates new rows.

Each figure is the median of ``--rounds`` (3) rounds, registered and unregistered
alternating (a, b, b, a, ...) so that load drifting during the run favours neither;
the rounds' figures are printed beside each median. A throughput counts the
transactions that committed within the window; those that were still in flight are
not counted (but their events are checked). Errors raised under concurrency
(deadlocks, lock timeouts) are counted, printed, and their transactions not counted.

SQLite admits one writer at a time whatever the model: with 20 ms inside each
transaction both models are capped near 50 tx/s by the database itself, so its ratio
says what capture costs on top of SQLite's own serialization, not what the outbox lock
costs. It is configured with ``transaction_mode`` ``IMMEDIATE`` (Django >= 5.1), as the
README asks of SQLite sites with concurrent writers.

Databases: ``bench_writers_<pid>`` on the PostgreSQL server of ``bench/pg.py``
(``CFS_PG_*``, ``CFS_BENCH_PG=0`` leaves it out) and on the MariaDB server of the test
suite (``CFS_MARIADB_*``, ``CFS_BENCH_MARIADB=0`` leaves it out), created fresh and dropped
at exit; SQLite in a temporary directory, removed at exit.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import pg  # noqa: E402

VENDORS = ("postgresql", "mysql", "sqlite")
ALIAS = {"postgresql": "postgres", "mysql": "mariadb", "sqlite": "default"}
NAME = {"postgresql": "PostgreSQL", "mysql": "MariaDB", "sqlite": "SQLite"}
DB_NAME = f"bench_writers_{os.getpid()}"
WORK = 0.020  # seconds of "other work" between the two saves of part 1
PER_TRANSACTION = 10  # saves per transaction in part 3
JOIN_SLACK = 120.0  # seconds a writer may run past its window before it counts as hung
# The models' codes are 2 characters, unique; one case only (MariaDB's collation
# ignores case): 1,296 codes.
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
CODES = [a + b for a in ALPHABET for b in ALPHABET]
REGISTERED = "testapp.country"


# ------------------------------------------------------------------ servers


def mariadb_server() -> dict[str, Any]:
    """The test suite's MariaDB server (``CFS_MARIADB_*``), without a database name."""
    from tests import dbs

    config = dbs.mariadb_config()
    return {k: config[k] for k in ("HOST", "PORT", "USER", "PASSWORD")}


def mariadb_admin(sql: str) -> str:
    """Run one statement on the MariaDB server with no database selected; its first value."""
    from tests import dbs

    if not dbs.ensure_mysql_driver():
        raise RuntimeError("neither mysqlclient nor PyMySQL is importable")
    import MySQLdb

    server = mariadb_server()
    conn = MySQLdb.connect(
        host=server["HOST"],
        port=int(server["PORT"]),
        user=server["USER"],
        password=server["PASSWORD"],
        connect_timeout=3,
    )
    try:
        cursor = conn.cursor()
        cursor.execute(sql)
        row = cursor.fetchone() if cursor.description else None
        return str(row[0]) if row else ""
    finally:
        conn.close()


def mariadb_unavailable() -> str:
    """ "" when the server is to be used and accepts a login, else why not."""
    if os.environ.get("CFS_BENCH_MARIADB", "1").strip().lower() in {"0", "false", "no"}:
        return "disabled by CFS_BENCH_MARIADB=0"
    try:
        mariadb_admin("SELECT 1")
    except Exception as exc:  # any failure means "not usable"
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return ""


def create_databases(vendors: Sequence[str]) -> None:
    if "postgresql" in vendors:
        pg.admin(f'DROP DATABASE IF EXISTS "{DB_NAME}"')
        pg.admin(f'CREATE DATABASE "{DB_NAME}"')
    if "mysql" in vendors:
        mariadb_admin(f"DROP DATABASE IF EXISTS `{DB_NAME}`")
        mariadb_admin(
            f"CREATE DATABASE `{DB_NAME}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        )


def drop_databases(vendors: Sequence[str]) -> None:
    from django.db import connections

    connections.close_all()
    for vendor, drop in (
        ("postgresql", lambda: pg.admin(f'DROP DATABASE IF EXISTS "{DB_NAME}"')),
        ("mysql", lambda: mariadb_admin(f"DROP DATABASE IF EXISTS `{DB_NAME}`")),
    ):
        if vendor in vendors:
            try:
                drop()
            except Exception as exc:  # leave it; say so
                print(f"could not drop {NAME[vendor]} database {DB_NAME}: {exc}")


def configure(vendors: Sequence[str], directory: str) -> None:
    """Django settings for this process; SQLite is ``default`` whether measured or not
    (Django wants a default database)."""
    import django
    from django.conf import settings

    sqlite_options: dict[str, Any] = {"timeout": 30}
    if django.VERSION >= (5, 1):
        sqlite_options["transaction_mode"] = "IMMEDIATE"
    databases: dict[str, dict[str, Any]] = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(directory, "writers.sqlite3"),
            "OPTIONS": sqlite_options,
        }
    }
    if "postgresql" in vendors:
        databases["postgres"] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DB_NAME,
            **pg.server(),
        }
    if "mysql" in vendors:
        databases["mariadb"] = {
            "ENGINE": "django.db.backends.mysql",
            "NAME": DB_NAME,
            **mariadb_server(),
            "OPTIONS": {"charset": "utf8mb4", "isolation_level": "read committed"},
        }
    settings.configure(
        DEBUG=False,  # DEBUG would keep every query in memory
        SECRET_KEY="changefeed-sync-bench-not-a-secret",  # benchmark value only
        USE_TZ=True,
        TIME_ZONE="UTC",
        INSTALLED_APPS=["django.contrib.contenttypes", "changefeed_sync", "tests.testapp"],
        DATABASES=databases,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    from django.core.management import call_command

    for vendor in vendors:
        call_command(
            "migrate", database=ALIAS[vendor], run_syncdb=True, verbosity=0, interactive=False
        )


def server_version(vendor: str) -> str:
    from django.db import connections

    connection = connections[ALIAS[vendor]]
    if vendor == "sqlite":
        import sqlite3

        return sqlite3.sqlite_version
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version" if vendor == "postgresql" else "SELECT VERSION()")
        return str(cursor.fetchone()[0])


# ------------------------------------------------------------------ helpers


def models() -> dict[bool, Any]:
    """registered -> model: Country (registered) and Plain (its unregistered twin)."""
    from changefeed_sync import registry
    from tests.testapp.models import Country, Plain

    if not registry.is_registered(Country) or registry.is_registered(Plain):
        raise SystemExit("benchmark self-check failed: Country must be registered, Plain not")
    return {True: Country, False: Plain}


def kind(registered: bool) -> str:
    return "registered" if registered else "unregistered"


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:160]


def load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def code_under_test() -> str:
    """The commit measured, and whether the package differs from it (the tree is shared)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "changefeed_sync"],
            capture_output=True, text=True, check=True,
        ).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "n/a (no git)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"{head[:90]}" + (f"; uncommitted: {', '.join(changed)}" if changed else "; clean")


def package_source() -> str:
    """Where changefeed_sync was imported from: this tree, or (an installed copy) elsewhere."""
    import changefeed_sync

    where = Path(changefeed_sync.__file__).resolve().parent.parent
    return "this tree" if where == ROOT else f"{where} (NOT this tree)"


def wipe_rows(alias: str, model: Any, name: str) -> None:
    """Delete this bench's rows named ``name`` with plain SQL: no signals, nothing captured."""
    from django.db import connections, transaction

    connection = connections[alias]
    qn = connection.ops.quote_name
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {qn(model._meta.db_table)} WHERE {qn('name')} = %s", [name])


def feed_events(alias: str, since: int) -> Counter[tuple[str, str]]:
    """(code, saved name) of every Country upsert in the feed after ``since``, counted;
    other events count under ("?", label)."""
    from changefeed_sync.source import feed

    found: Counter[tuple[str, str]] = Counter()
    seen = since
    while True:
        page = feed.read(seen, 1000, using=alias)
        for event in page.events:
            if event["seq"] <= seen:
                raise SystemExit(f"benchmark self-check failed: feed went back to {event['seq']}")
            seen = event["seq"]
            if event["model"] == REGISTERED and event["op"] == "upsert":
                found[(event["key"][0], event["data"]["name"])] += 1
            else:
                found[("?", f"{event['model']} {event['op']}")] += 1
        if not page.more:
            return found


@dataclass
class Check:
    """What the outbox must hold after one measurement, and what it held."""

    what: str
    expected: int = 0
    found: int = 0
    missing: int = 0
    unexpected: int = 0

    @property
    def ok(self) -> bool:
        return self.expected == self.found and not self.missing and not self.unexpected


@dataclass
class Outbox:
    """Per database: captured saves committed during the run, and each measurement's check."""

    committed_saves: int = 0
    checks: list[Check] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # failed transactions, by error

    def verify(self, alias: str, since: int, expected: Counter[tuple[str, str]], what: str) -> bool:
        found = feed_events(alias, since)
        check = Check(
            what,
            expected=sum(expected.values()),
            found=sum(found.values()),
            missing=sum((expected - found).values()),
            unexpected=sum((found - expected).values()),
        )
        self.committed_saves += check.expected
        self.checks.append(check)
        if not check.ok:
            print(
                f"    OUTBOX CHECK FAILED ({what}): {check.expected} events expected, "
                f"{check.found} in the feed, {check.missing} missing, {check.unexpected} unexpected",
                flush=True,
            )
        return check.ok


# ------------------------------------------------------------------ 1, 2: many writers


@dataclass
class WriterRun:
    rate: float  # transactions committed within the window, per second
    committed: int  # every committed transaction, in the window or after it
    errors: Counter[str]
    expected: Counter[tuple[str, str]]  # (code, name) of every committed save


def writers(
    alias: str, model: Any, threads: int, seconds: float, work: float, tag: str
) -> WriterRun:
    """``threads`` threads, each its own connection and its own row, each running
    ``atomic(): save(); sleep(work); save()`` until the window closes."""
    from django.db import DatabaseError, connections, transaction

    window: dict[str, float] = {}

    def open_window() -> None:  # run by the last thread to reach the barrier
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + seconds

    barrier = threading.Barrier(threads + 1, action=open_window)
    ends: list[list[float]] = [[] for _ in range(threads)]
    names: list[list[str]] = [[] for _ in range(threads)]
    errors: list[Counter[str]] = [Counter() for _ in range(threads)]
    fatal: list[BaseException | None] = [None] * threads

    def writer(i: int) -> None:
        try:
            obj = model._base_manager.using(alias).get(code=CODES[i])  # connects, out of the window
            barrier.wait()
            deadline = window["end"]
            k = 0
            while time.perf_counter() < deadline:
                first, second = f"{tag}:{i}:{k}:a", f"{tag}:{i}:{k}:b"
                k += 1
                try:
                    with transaction.atomic(using=alias):
                        obj.name = first
                        obj.save(using=alias)
                        if work:
                            time.sleep(work)
                        obj.name = second
                        obj.save(using=alias)
                except DatabaseError as exc:
                    errors[i][one_line(exc)] += 1
                    obj = model._base_manager.using(alias).get(code=CODES[i])
                    continue
                ends[i].append(time.perf_counter())
                names[i] += (first, second)
        except BaseException as exc:  # reported by the main thread
            fatal[i] = exc
            barrier.abort()
        finally:
            connections.close_all()  # this thread's connections

    workers = [
        threading.Thread(target=writer, args=(i,), name=f"writer-{i}", daemon=True)
        for i in range(threads)
    ]
    gc.collect()
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    for worker in workers:
        worker.join(seconds + JOIN_SLACK)
    hung = [w.name for w in workers if w.is_alive()]
    if hung:
        raise SystemExit(f"writers still running {JOIN_SLACK:.0f} s after the window: {hung}")
    failed = [(i, exc) for i, exc in enumerate(fatal) if exc is not None]
    if failed:
        i, exc = failed[0]
        raise SystemExit(f"writer {i} failed outside a transaction: {one_line(exc)}") from exc
    in_window = sum(1 for per in ends for t in per if t <= window["end"])
    expected = Counter((CODES[i], name) for i in range(threads) for name in names[i])
    return WriterRun(
        rate=in_window / seconds,
        committed=sum(len(per) for per in ends),
        errors=sum(errors, Counter()),
        expected=expected,
    )


# ------------------------------------------------------------------ 3: one writer


@contextmanager
def clock(spent: dict[str, float], case: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        spent[case] = spent.get(case, 0.0) + time.perf_counter() - start


def one_writer(alias: str, n: int, first_code: int) -> tuple[dict[str, float], Counter[Any]]:
    """n new rows per model in transactions of PER_TRANSACTION saves, then n more each in
    autocommit, the models alternating transaction by transaction (save by save in
    autocommit); seconds per case, and the events the registered saves must have written."""
    from django.db import connections, transaction

    connection = connections[alias]
    if not connection.get_autocommit() or connection.in_atomic_block:
        raise SystemExit(f"benchmark self-check failed: {alias} is not in autocommit mode")
    by_registration = models()
    codes = CODES[first_code : first_code + n]
    if len(codes) < n:
        raise SystemExit(f"--saves at most {len(CODES) - first_code}")
    spent: dict[str, float] = {}
    expected: Counter[Any] = Counter()
    for phase in ("atomic", "autocommit"):
        for model in by_registration.values():
            wipe_rows(alias, model, "new")
        gc.collect()
        step = PER_TRANSACTION if phase == "atomic" else 1
        for t, start in enumerate(range(0, n, step)):
            chunk = codes[start : start + step]
            for registered in (True, False) if t % 2 else (False, True):
                model = by_registration[registered]
                with clock(spent, f"{phase} {kind(registered)}"):
                    if phase == "atomic":
                        with transaction.atomic(using=alias):
                            for code in chunk:
                                model(code=code, name="new").save(using=alias)
                    else:
                        model(code=chunk[0], name="new").save(using=alias)
        expected.update((code, "new") for code in codes)
    for model in by_registration.values():
        wipe_rows(alias, model, "new")
    return spent, expected


# ------------------------------------------------------------------ results


@dataclass
class Result:
    vendor: str
    case: str
    unit: str
    higher_is_better: bool  # rates (True) or times
    target: float | None  # registered/unregistered: min for rates, max for times
    target_text: str
    plain: list[float] = field(default_factory=list)  # per round, a rate
    registered: list[float] = field(default_factory=list)
    valid: bool = True  # False: the outbox check of one of its rounds failed

    def ratio(self) -> float:
        plain, registered = statistics.median(self.plain), statistics.median(self.registered)
        if self.higher_is_better:  # throughput: registered / unregistered
            return registered / plain if plain else float("nan")
        return plain / registered if registered else float("nan")  # time: registered / unregistered

    def verdict(self) -> str:
        if not self.valid:
            return "INVALID (events lost)"
        if self.target is None:
            return ""
        ratio = self.ratio()
        met = ratio >= self.target if self.higher_is_better else ratio <= self.target
        return "met" if met else "MISSED"


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def figure(samples: Sequence[float]) -> str:
    if not samples:
        return "-"
    spread = "/".join(fmt(s) for s in samples)
    return f"{fmt(statistics.median(samples))} ({spread})" if len(samples) > 1 else fmt(samples[0])


def table(results: Sequence[Result]) -> str:
    rows = [
        ("database", "case", "unit", "unregistered", "registered", "ratio", "target", "verdict"),
    ]
    for r in results:
        ratio = r.ratio()
        rows.append(
            (
                NAME[r.vendor],
                r.case,
                r.unit,
                figure(r.plain),
                figure(r.registered),
                f"{ratio:.2f}x",
                r.target_text,
                r.verdict(),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) if c < 6 else cell.ljust(w)
                  for c, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )  # fmt: skip


# ------------------------------------------------------------------ one database


def bench_database(vendor: str, args: argparse.Namespace, results: list[Result]) -> Outbox:
    from changefeed_sync.models import Event
    from changefeed_sync.source import feed

    alias = ALIAS[vendor]
    by_registration = models()
    outbox = Outbox()
    for model in by_registration.values():  # one row per writer thread, in both tables
        model._base_manager.using(alias).bulk_create(
            [model(code=CODES[i], name="start") for i in range(args.threads)]
        )
    start_events = Event.objects.using(alias).count()  # the rows above are events too
    outbox.committed_saves = start_events
    print(
        f"\n[{NAME[vendor]} {server_version(vendor)}] load average {load()}",
        flush=True,
    )

    # A short warm-up of both models (connections, caches, plans); checked, not kept.
    for registered in (False, True):
        since = feed.head(alias)
        run = writers(
            alias, by_registration[registered], args.threads, 1.0, WORK, f"warm{registered:d}"
        )
        outbox.verify(alias, since, run.expected if registered else Counter(), "warm-up")

    cases = [
        (f"{args.threads} threads, save; {WORK * 1000:.0f} ms; save", WORK, 0.9),
        (f"{args.threads} threads, save; save", 0.0, None),
    ]
    for case, work, target in cases:
        result = Result(
            vendor,
            case,
            "tx/s",
            higher_is_better=True,
            target=target if vendor != "sqlite" else None,
            target_text=f">= {target}x" if target is not None and vendor != "sqlite" else "",
        )
        errors: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}
        for rnd in range(args.rounds):
            for registered in (False, True) if rnd % 2 == 0 else (True, False):
                since = feed.head(alias)
                run = writers(
                    alias, by_registration[registered], args.threads, args.seconds, work,
                    f"{'w' if work else 'n'}{rnd}{registered:d}",
                )  # fmt: skip
                ok = outbox.verify(
                    alias, since, run.expected if registered else Counter(),
                    f"{case}, {kind(registered)}, round {rnd + 1}",
                )  # fmt: skip
                result.valid &= ok
                (result.registered if registered else result.plain).append(run.rate)
                errors[registered] += run.errors
                outbox.errors.update({f"{kind(registered)}: {m}": n for m, n in run.errors.items()})
                print(
                    f"  round {rnd + 1}  {case:<32} {kind(registered):<12} "
                    f"{run.rate:8.1f} tx/s  ({run.committed} committed, "
                    f"{sum(run.errors.values())} failed; load {load()})",
                    flush=True,
                )
        for registered, counted in errors.items():
            for message, count in counted.most_common():
                print(f"    {kind(registered)}: {count} x {message}", flush=True)
        results.append(result)
        if args.breakdown and work and vendor == "mysql":
            breakdown(alias, by_registration, args, work, result, outbox)

    # 3: one thread. A warm-up round (checked, not kept), then the rounds.
    first_code = args.threads
    atomic = Result(
        vendor, f"1 thread, {PER_TRANSACTION} creates per atomic()", "saves/s",
        higher_is_better=False, target=1.3, target_text="<= 1.3x",
    )  # fmt: skip
    auto = Result(
        vendor, "1 thread, create in autocommit", "saves/s",
        higher_is_better=False, target=1.17, target_text="<= 1.12-1.17x",
    )  # fmt: skip
    since = feed.head(alias)
    _, expected = one_writer(alias, min(100, args.saves), first_code)
    outbox.verify(alias, since, expected, "one writer, warm-up")
    for rnd in range(args.rounds):
        since = feed.head(alias)
        spent, expected = one_writer(alias, args.saves, first_code)
        ok = outbox.verify(alias, since, expected, f"one writer, round {rnd + 1}")
        for result, phase in ((atomic, "atomic"), (auto, "autocommit")):
            result.valid &= ok
            result.plain.append(args.saves / spent[f"{phase} unregistered"])
            result.registered.append(args.saves / spent[f"{phase} registered"])
            print(
                f"  round {rnd + 1}  {result.case:<32} unregistered "
                f"{result.plain[-1]:8.0f} saves/s, registered {result.registered[-1]:8.0f} saves/s",
                flush=True,
            )
    results += [atomic, auto]

    # 4: the whole run, counted once more.
    total = Event.objects.using(alias).count()
    whole = Check(
        "whole run", expected=outbox.committed_saves, found=total,
        missing=max(0, outbox.committed_saves - total),
        unexpected=max(0, total - outbox.committed_saves),
    )  # fmt: skip
    outbox.checks.append(whole)
    failed = [c for c in outbox.checks if not c.ok]
    print(
        f"  outbox: {outbox.committed_saves:,} registered saves committed (the {start_events} "
        f"seed rows included), {total:,} events in the outbox; {len(outbox.checks) - 1} "
        f"measurements read back from the feed: "
        + ("every event present, each once" if not failed else f"{len(failed)} FAILED"),
        flush=True,
    )
    return outbox


def breakdown(
    alias: str,
    by_registration: dict[bool, Any],
    args: argparse.Namespace,
    work: float,
    result: Result,
    outbox: Outbox,
) -> None:
    """``--breakdown`` (MariaDB): where the registered writers' throughput goes. The
    registered model once more, with the outbox INSERT replaced by a no-op: capture's
    Python without the statement that writes its events at commit. A diagnostic only
    (no event is written, so the feed must hold none of these saves), never a verdict;
    on PostgreSQL a save's event is part of its row's statement, so it has no such part."""
    from changefeed_sync import outbox as outbox_module
    from changefeed_sync.source import feed

    rates = []
    real = outbox_module._insert
    for rnd in range(args.rounds):
        since = feed.head(alias)
        outbox_module._insert = lambda using, batch: None  # type: ignore[assignment]
        try:
            run = writers(
                alias, by_registration[True], args.threads, args.seconds, work, f"x{rnd}"
            )
        finally:
            outbox_module._insert = real
        outbox.verify(alias, since, Counter(), f"breakdown, round {rnd + 1}")
        rates.append(run.rate)
    plain = statistics.median(result.plain)
    rate = statistics.median(rates)
    print(
        f"  breakdown  {result.case}: unregistered {plain:,.0f} tx/s; registered, its events "
        f"not inserted {rate:,.0f} tx/s ({rate / plain:.2f}x; rounds {'/'.join(f'{r:.0f}' for r in rates)}); "
        f"registered {statistics.median(result.registered):,.0f} tx/s ({result.ratio():.2f}x)",
        flush=True,
    )


# ------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="window per measurement (10)")
    parser.add_argument("--threads", type=int, default=16, help="writer threads (16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (3)")
    parser.add_argument(
        "--saves", type=int, default=1000, help="one-writer saves per model and mode (1000)"
    )
    parser.add_argument(
        "--only", action="append", choices=VENDORS, help="this database only (repeatable)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="MariaDB: also measure the registered writers without their events' INSERT "
        "(a diagnostic of where the throughput goes, not a verdict)",
    )
    args = parser.parse_args(argv)
    if args.saves % PER_TRANSACTION or args.saves < PER_TRANSACTION:
        parser.error(f"--saves must be a multiple of {PER_TRANSACTION}")
    if args.threads + args.saves > len(CODES):
        parser.error(f"--threads + --saves must be at most {len(CODES)}")

    vendors = [v for v in VENDORS if args.only is None or v in args.only]
    for vendor, why in (
        ("postgresql", pg.unavailable() if "postgresql" in vendors else ""),
        ("mysql", mariadb_unavailable() if "mysql" in vendors else ""),
    ):
        if why:
            print(f"{NAME[vendor]} left out: {why}")
            vendors.remove(vendor)
    if not vendors:
        print("no database to measure")
        return 1

    import django

    directory = tempfile.mkdtemp(prefix="changefeed_sync-writers-")
    create_databases(vendors)
    results: list[Result] = []
    outboxes: dict[str, Outbox] = {}
    load_before = load()
    started = time.perf_counter()
    try:
        configure(vendors, directory)
        print(
            f"changefeed_sync writers benchmark: Python {sys.version.split()[0]}, "
            f"Django {django.get_version()}, {os.cpu_count()} CPUs; "
            f"{args.threads} threads x {args.seconds:g} s, {args.rounds} rounds, "
            f"{args.saves} one-writer saves per model and mode\n"
            f"code measured: {code_under_test()}; changefeed_sync imported from "
            f"{package_source()}\n"
            f"load average (1 / 5 / 15 min) at start: {load_before}",
            flush=True,
        )
        for vendor in vendors:
            outboxes[vendor] = bench_database(vendor, args, results)
    finally:
        drop_databases(vendors)
        shutil.rmtree(directory, ignore_errors=True)

    print(
        f"\nResults (medians of {args.rounds} rounds, the rounds in brackets; ratio = "
        f"registered/unregistered throughput for tx/s, time for saves/s; "
        f"{time.perf_counter() - started:.0f} s)\n"
        f"load average (1 / 5 / 15 min): {load_before} at start, {load()} at end\n"
    )
    print(table(results))
    print()
    lost = False
    for vendor, outbox in outboxes.items():
        whole = outbox.checks[-1]
        failed = [c for c in outbox.checks if not c.ok]
        lost |= bool(failed)
        print(
            f"outbox {NAME[vendor]}: {whole.expected:,} registered saves committed, "
            f"{whole.found:,} events; per measurement: "
            + (
                "every committed save's event in the feed, each once"
                if not failed
                else "FAILED: " + "; ".join(
                    f"{c.what}: {c.missing} missing, {c.unexpected} unexpected" for c in failed
                )
            )
        )  # fmt: skip
        print(
            f"errors under concurrency {NAME[vendor]}: "
            + ("; ".join(f"{n} x {m}" for m, n in outbox.errors.most_common()) or "none")
        )
    missed = [f"{NAME[r.vendor]} {r.case}" for r in results if r.verdict() not in ("", "met")]
    print("\ntargets missed: " + ("; ".join(missed) if missed else "none"))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
