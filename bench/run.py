"""Benchmarks of changefeed_sync, every figure and its reference measured side by side in one run.

    .venv-django6/bin/python bench/run.py                   # full run (5-10 minutes on 2 CPUs)
    .venv-django6/bin/python bench/run.py --quick           # smoke run, small sizes
    .venv-django6/bin/python bench/run.py --only apply      # one section: capture | apply | ochanges
    .venv-django6/bin/python bench/run.py --json PATH       # also write the results as JSON
    .venv-django6/bin/python bench/run.py --profile         # cProfile of the timed regions only

Sections (each figure is the median of several repetitions; the contenders of a
comparison are run in alternation, so that load from other processes drifting
during the run favours none of them):

1. capture: ``save()`` of a registered model (Country) against an unregistered
   model of the same shape (Plain), creating rows and updating them, every save
   its own transaction (autocommit, as in a web request), on SQLite and
   PostgreSQL. Target: registered/unregistered time <= 1.5x. Beside them, the
   floor of any same-transaction outbox: raw SQL INSERT alone against
   INSERT + event INSERT in one transaction.
2. apply: events/s from the source's outbox (``feed.read``, pages of 1000)
   applied with ``apply.apply_page`` into a second SQLite database: creations
   into an empty target and into one already holding 100k other rows, then
   edits of random rows. Translation-shaped data: 10 countries x 5 languages x
   the same N keys. Beside them, Django's own ``bulk_create(update_conflicts=True)``
   of the same rows (the ceiling for an ORM-level apply) and a raw SQL upsert
   (the storage's limit). Target: >= 40,000 events/s. Then the cost of the
   fallback: pages that need the events' own order (each hands a unique value on
   between two rows, as a swap does) against merged pages of as many events.
3. ochanges: one incremental sync of 10 updated rows when the table holds 100k
   rows against 1k rows. Target: within 1.5x.

Every section checks its own result (rows and values on the target) and stops
with "benchmark self-check failed" rather than print a figure for wrong work.

Databases come from ``bench/settings.py``: SQLite files in a temporary
directory (removed at exit) and, when the server answers, a PostgreSQL
database ``bench_changefeed`` created fresh for the run and dropped after it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import os
import pstats
import random
import shutil
import sqlite3
import statistics
import string
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"

import django  # noqa: E402

from bench import pg  # noqa: E402

SOURCE = "default"
TARGET = "target"
SMALL_SOURCE = "small_source"  # O(changes): the small table lives in its own pair of
SMALL_TARGET = "small_target"  # databases, so both sizes can be measured in alternation
POSTGRES = "postgres"
PAGE = 1000  # events per feed page, the feed's default limit
N_COUNTRIES = 10
N_LANGUAGES = 5  # per country


@dataclass(frozen=True)
class Sizes:
    capture_rows: int  # rows created, then updated, per model per repetition
    capture_reps: int
    keys_per_language: int  # apply: 10 countries x 5 languages x this many Copy rows
    updates: int  # apply: events updating random existing rows
    prefill: int  # rows already in the target for the "full target" case
    apply_reps: int
    ochanges_small: int
    ochanges_large: int
    ochanges_changes: int
    ochanges_reps: int
    fallback_rows: int  # apply fallback: Nation rows, swapped in pairs


FULL = Sizes(
    capture_rows=500,
    capture_reps=5,
    keys_per_language=1000,
    updates=10_000,
    prefill=100_000,
    apply_reps=3,
    ochanges_small=1_000,
    ochanges_large=100_000,
    ochanges_changes=10,
    ochanges_reps=21,
    fallback_rows=4_000,
)
QUICK = Sizes(
    capture_rows=100,
    capture_reps=3,
    keys_per_language=40,
    updates=1_000,
    prefill=5_000,
    apply_reps=2,
    ochanges_small=1_000,
    ochanges_large=5_000,
    ochanges_changes=10,
    ochanges_reps=5,
    fallback_rows=400,
)


# ------------------------------------------------------------------ results


@dataclass
class Row:
    section: str
    case: str
    value: float
    unit: str
    ratio: float | None = None
    ratio_of: str = ""  # what the ratio compares
    target: str = ""
    ok: bool | None = None
    # The same rate per second of this process's CPU time, which leaves out time spent
    # waiting for a CPU while other processes run; only where all the work is
    # in-process (SQLite), since a database server's CPU is not counted.
    per_cpu: float | None = None
    samples: list[float] = field(default_factory=list)  # seconds, one per repetition


RESULTS: list[Row] = []


def record(row: Row) -> Row:
    RESULTS.append(row)
    ratio = f"  {row.ratio:.2f}x {row.ratio_of}" if row.ratio is not None else ""
    verdict = "" if row.ok is None else ("  ok" if row.ok else "  MISSED")
    target = f" (target {row.target})" if row.target else ""
    cpu = f" [{fmt(row.per_cpu)} per CPU-s]" if row.per_cpu is not None else ""
    print(
        f"  {row.case:<50} {fmt(row.value):>10} {row.unit}{cpu}{ratio}{target}{verdict}",
        flush=True,
    )
    return row


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def table() -> str:
    lines = [
        f"{'section':<9} {'case':<50} {'median':>10} {'unit':<9} {'per CPU-s':>10} {'ratio':>7}  "
        f"{'compares':<26} {'target':<9} verdict",
    ]
    for r in RESULTS:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        cpu = fmt(r.per_cpu) if r.per_cpu is not None else ""
        verdict = "" if r.ok is None else ("ok" if r.ok else "MISSED")
        lines.append(
            f"{r.section:<9} {r.case:<50} {fmt(r.value):>10} {r.unit:<9} {cpu:>10} {ratio:>7}  "
            f"{r.ratio_of:<26} {r.target:<9} {verdict}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ timing

PROFILER: cProfile.Profile | None = None


@contextmanager
def timed(into: list[float], cpu: list[float] | None = None) -> Iterator[None]:
    """Time the block, wall clock into ``into`` and this process's CPU time into ``cpu``
    (and profile it, with --profile); collect garbage first so that a collection left
    over from setup does not land in the measurement."""
    gc.collect()
    if PROFILER is not None:
        PROFILER.enable()
    cpu_start = time.process_time()
    start = time.perf_counter()
    try:
        yield
    finally:
        into.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - cpu_start)
        if PROFILER is not None:
            PROFILER.disable()


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


# ------------------------------------------------------------------ database helpers


def setup_databases() -> list[str]:
    """Create the fresh PostgreSQL database (if reachable), set Django up, create tables."""
    from bench import settings as bench_settings

    aliases = [SOURCE, TARGET, SMALL_SOURCE, SMALL_TARGET]
    if POSTGRES in bench_settings.DATABASES:
        _recreate_postgres_database(bench_settings)
        aliases.append(POSTGRES)
    else:
        print(f"PostgreSQL left out: {bench_settings.POSTGRES_UNAVAILABLE}")
    django.setup()
    from django.core.management import call_command

    for alias in aliases:
        call_command("migrate", database=alias, run_syncdb=True, verbosity=0, interactive=False)
    return aliases


def _recreate_postgres_database(bench_settings: Any) -> None:
    name = bench_settings.PG_DATABASE
    pg.admin(f'DROP DATABASE IF EXISTS "{name}"')
    pg.admin(f'CREATE DATABASE "{name}"')


def teardown(aliases: Sequence[str]) -> None:
    from django.db import connections

    from bench import settings as bench_settings

    for alias in aliases:
        connections[alias].close()
    if POSTGRES in aliases:
        try:
            pg.admin(f'DROP DATABASE IF EXISTS "{bench_settings.PG_DATABASE}"')
        except Exception as exc:  # leave it; the next run drops it anyway
            print(f"could not drop {bench_settings.PG_DATABASE}: {exc}")
    shutil.rmtree(bench_settings.BENCH_DIR, ignore_errors=True)


def wipe(alias: str, *models: Any) -> None:
    """Empty tables (children first) with plain DELETEs: no signals, nothing captured."""
    from django.db import connections, transaction

    connection = connections[alias]
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        for model in models:
            cursor.execute(f"DELETE FROM {connection.ops.quote_name(model._meta.db_table)}")


def wipe_synced(alias: str) -> None:
    from changefeed_sync.models import DataSource, Event
    from tests.testapp.models import Copy, Country, Language, Tag

    wipe(alias, Copy.tags.through, Copy, Tag, Language, Country, Event, DataSource)


def last_event_id(alias: str) -> int:
    """Position of the newest event (ids keep growing after a wipe: AUTOINCREMENT / sequences)."""
    from changefeed_sync.models import Event

    return Event.objects.using(alias).order_by("-id").values_list("id", flat=True).first() or 0


def event_count(alias: str) -> int:
    from changefeed_sync.models import Event

    return Event.objects.using(alias).count()


def seed_parents(alias: str, *, capture: bool) -> list[Any]:
    """10 countries x 5 languages; captured as events when ``capture``."""
    import changefeed_sync
    from tests.testapp.models import Country, Language

    with nullcontext() if capture else changefeed_sync.applying():
        countries = Country.objects.using(alias).bulk_create(
            [Country(code=f"c{i}", name=f"Country {i}") for i in range(N_COUNTRIES)]
        )
        languages = Language.objects.using(alias).bulk_create(
            [
                Language(country_id=c.pk, code=f"l{j}", name=f"Language {j} of {c.code}")
                for c in countries
                for j in range(N_LANGUAGES)
            ]
        )
    return languages


def copy_specs(languages: Sequence[Any], prefix: str, count: int) -> list[tuple[int, str, str]]:
    """(language_id, key, value) for ``count`` rows: the same ``count / len(languages)``
    keys translated in every language, as in a real translation table, language by
    language (one import per language)."""
    keys = count // len(languages)
    check(keys * len(languages) == count, f"{count} rows do not split over the languages")
    return [
        (
            language.pk,
            f"{prefix}.section{k // 100}.key{k:06d}",
            f"Text of {prefix} key {k} in language {language.pk}, a sentence of realistic length.",
        )
        for language in languages
        for k in range(keys)
    ]


def create_copies(alias: str, specs: Sequence[tuple[int, str, str]], *, capture: bool) -> None:
    from django.db import transaction

    import changefeed_sync
    from tests.testapp.models import Copy

    with nullcontext() if capture else changefeed_sync.applying():
        for start in range(0, len(specs), 10_000):
            chunk = specs[start : start + 10_000]
            with transaction.atomic(using=alias):
                Copy.objects.using(alias).bulk_create(
                    [Copy(language_id=lang, key=key, value=value) for lang, key, value in chunk],
                    batch_size=500,
                )


def new_data_source(alias: str, checkpoint: int) -> Any:
    from changefeed_sync.models import DataSource

    return DataSource.objects.using(alias).create(
        name="bench-source",
        url="http://127.0.0.1:1/sync/",
        client_name="bench-target",
        secrets="bench-secret",
        checkpoint=checkpoint,
    )


def pump(
    ds: Any,
    source: str = SOURCE,
    target: str = TARGET,
    *,
    read_times: list[float] | None = None,
    apply_times: list[float] | None = None,
) -> int:
    """Move the source's outbox into the target from the checkpoint, page by page (no HTTP).

    Returns the number of events applied; adds the time spent reading and
    applying to the given lists (one sum per call).
    """
    from changefeed_sync.source import feed
    from changefeed_sync.target.apply import apply_page

    read_s = apply_s = 0.0
    events = 0
    while True:
        t0 = time.perf_counter()
        page = feed.read(ds.checkpoint, PAGE, using=source)
        t1 = time.perf_counter()
        read_s += t1 - t0
        if not page.events:
            break
        stats = apply_page(ds, page.events, since=page.since, last_seq=page.last_seq, using=target)
        apply_s += time.perf_counter() - t1
        if stats is None:
            raise RuntimeError("checkpoint moved under the benchmark")
        events += stats.events
        if not page.more:
            break
    if read_times is not None:
        read_times.append(read_s)
    if apply_times is not None:
        apply_times.append(apply_s)
    return events


def check(condition: bool, message: str) -> None:
    """The benchmark checks its own work: a wrong result must not print a figure."""
    if not condition:
        raise SystemExit(f"benchmark self-check failed: {message}")


# ------------------------------------------------------------------ 1. capture

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
CODES = [a + b for a in ALPHABET for b in ALPHABET]  # 3844 distinct two-character codes

# The contenders, measured save by save in alternation (a, b, b, a, a, b, ...) so
# that a disk or CPU hiccup from another process hits all of them alike.
CAPTURE_CASES = ("plain", "registered", "raw autocommit", "raw outbox", "raw one statement")


_RAW_WRITERS = itertools.count()


class _RawWriter:
    """The floor of any same-transaction outbox, in plain SQL with no ORM and no Python
    work around it: the row's INSERT alone in autocommit ("raw autocommit"), against
    BEGIN + the same INSERT + one event INSERT + COMMIT ("raw outbox"), and on
    PostgreSQL against the INSERT and the event INSERT as one prepared WITH
    statement ("raw one statement", what a registered save sends there)."""

    def __init__(self, alias: str) -> None:
        from django.db import connections

        from changefeed_sync import outbox
        from changefeed_sync.models import Event
        from tests.testapp.models import Plain

        self.alias = alias
        self.connection = connections[alias]
        qn = self.connection.ops.quote_name
        self.row_sql = (
            f"INSERT INTO {qn(Plain._meta.db_table)} ({qn('code')}, {qn('name')}) VALUES (%s, %s)"
        )
        # One event row as the ORM would write it, prepared once: the floor leaves out
        # the Python work of building it, and follows the Event model's columns.
        event = outbox.make_event(
            "testapp.plain", "upsert", ["xx"], data={"code": "xx", "name": "created"},
            changed=["code", "name"],
        ).instance()  # fmt: skip
        fields = [f for f in Event._meta.concrete_fields if not f.primary_key]
        self.event_params = [
            f.get_db_prep_save(f.pre_save(event, True), self.connection) for f in fields
        ]
        self.event_sql = (
            f"INSERT INTO {qn(Event._meta.db_table)} ({', '.join(qn(str(f.column)) for f in fields)}) "
            f"VALUES ({', '.join(['%s'] * len(fields))})"
        )
        # The statement changefeed_sync/source/outbox_pg.py sends, prepared once, with the same
        # event parameters.
        event_from_row = self.event_sql.replace(" VALUES (", " SELECT ")[:-1] + ' FROM "r"'
        one_sql = (
            f'WITH "r" AS ({self.row_sql} RETURNING {qn("id")}), '
            f'"e" AS ({event_from_row}) SELECT * FROM "r"'
        )
        count = one_sql.count("%s")
        for n in range(1, count + 1):
            one_sql = one_sql.replace("%s", f"${n}", 1)
        name = f"bench_one_{next(_RAW_WRITERS)}"  # a new name per repetition's writer
        self.prepare_sql = f"PREPARE {name} AS {one_sql}"
        self.one_sql = f"EXECUTE {name}({', '.join(['%s'] * count)})"

    def autocommit(self, code: str) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(self.row_sql, [code, "created"])

    def outbox(self, code: str) -> None:
        from django.db import transaction

        with transaction.atomic(using=self.alias), self.connection.cursor() as cursor:
            cursor.execute(self.row_sql, [code, "created"])
            cursor.execute(self.event_sql, self.event_params)

    def one_statement(self, code: str) -> None:
        with self.connection.cursor() as cursor:
            if self.prepare_sql:  # the first call of a repetition, as a save's first
                cursor.execute(self.prepare_sql)
                self.prepare_sql = ""
            cursor.execute(self.one_sql, [code, "created", *self.event_params])


def _capture_rep(alias: str, n: int) -> dict[str, float]:
    """One repetition: n creates then n updates per model, plus the raw SQL floor;
    seconds per case, each save timed on its own."""
    from django.db import connections

    from changefeed_sync.models import Event
    from tests.testapp.models import Copy, Country, Language, Plain

    connection = connections[alias]
    check(
        connection.get_autocommit() and not connection.in_atomic_block,
        f"{alias} is not in autocommit mode",
    )
    wipe(alias, Copy.tags.through, Copy, Language, Country, Plain, Event)
    models = {"plain": Plain, "registered": Country}
    raw = _RawWriter(alias)
    raw_ops = {"raw autocommit": raw.autocommit, "raw outbox": raw.outbox}
    if connection.vendor == "postgresql":
        raw_ops["raw one statement"] = raw.one_statement
    # Distinct codes per case: they share the Plain table's unique column.
    codes = {case: CODES[i * n : (i + 1) * n] for i, case in enumerate(CAPTURE_CASES)}
    spent = {f"{m} {op}": 0.0 for m in models for op in ("create", "update")}
    spent.update({case: 0.0 for case in raw_ops})
    objs: dict[str, list[Any]] = {m: [] for m in models}
    clock = time.perf_counter
    gc.collect()
    if PROFILER is not None:
        PROFILER.enable()
    for i in range(n):
        for case in CAPTURE_CASES if i % 2 else reversed(CAPTURE_CASES):
            code = codes[case][i]
            if case.startswith("raw") and case not in raw_ops:
                continue
            if case in raw_ops:
                start = clock()
                raw_ops[case](code)
                spent[case] += clock() - start
            else:
                start = clock()
                obj = models[case](code=code, name="created")
                obj.save(using=alias)
                spent[f"{case} create"] += clock() - start
                objs[case].append(obj)
    for i in range(n):
        for name in models if i % 2 else reversed(models):
            obj = objs[name][i]
            start = clock()
            obj.name = "updated"
            obj.save(using=alias)
            spent[f"{name} update"] += clock() - start
    if PROFILER is not None:
        PROFILER.disable()
    events = Event.objects.using(alias).count()
    expected = (2 + len(raw_ops) - 1) * n  # 2 per Country, 1 per raw writer with an event
    check(events == expected, f"{events} events on {alias}, expected {expected}")
    check(Plain.objects.using(alias).filter(name="updated").count() == n, "Plain updates lost")
    return spent


def bench_capture(aliases: Sequence[str], sizes: Sizes) -> None:
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from changefeed_sync.models import Event
    from tests.testapp.models import Country, Plain

    n = sizes.capture_rows
    check(n * len(CAPTURE_CASES) <= len(CODES), f"at most {len(CODES) // 4} capture rows")
    for alias in [a for a in aliases if a in (SOURCE, POSTGRES)]:
        vendor = "sqlite" if alias != POSTGRES else "postgres"
        print(
            f"\n[capture] {vendor}: save() x {n} creates + {n} updates per model, autocommit, "
            f"saves of all cases interleaved, {sizes.capture_reps} repetitions",
            flush=True,
        )
        _capture_rep(alias, 20)  # warm-up, not kept
        reps = [_capture_rep(alias, n) for _ in range(sizes.capture_reps)]
        times = {case: [rep[case] for rep in reps] for case in reps[0]}
        # What one save sends to the database (outside the timings).
        counts = {}
        for name, model in (("Plain", Plain), ("Country", Country)):
            wipe(alias, Country, Plain, Event)
            obj = model(code="q1", name="created")
            with CaptureQueriesContext(connections[alias]) as created:
                obj.save(using=alias)
            obj.name = "updated"
            with CaptureQueriesContext(connections[alias]) as updated:
                obj.save(using=alias)
            counts[name] = f"{len(created)}/{len(updated)}"
        wipe(alias, Country, Plain, Event)

        for op in ("create", "update"):
            plain = median(times[f"plain {op}"])
            registered = median(times[f"registered {op}"])
            record(
                Row("capture", f"{vendor} {op} Plain (unregistered)", n / plain, "rows/s",
                    samples=times[f"plain {op}"])
            )  # fmt: skip
            ratio = registered / plain
            record(
                Row("capture", f"{vendor} {op} Country (registered)", n / registered, "rows/s",
                    ratio=ratio, ratio_of="registered/plain time", target="<= 1.5x",
                    ok=ratio <= 1.5, samples=times[f"registered {op}"])
            )  # fmt: skip
        floor = median(times["raw outbox"]) / median(times["raw autocommit"])
        record(
            Row("capture", f"{vendor} raw SQL INSERT, autocommit",
                n / median(times["raw autocommit"]), "rows/s", samples=times["raw autocommit"])
        )  # fmt: skip
        record(
            Row("capture", f"{vendor} raw SQL INSERT + event, one txn",
                n / median(times["raw outbox"]), "rows/s", ratio=floor,
                ratio_of="floor, BEGIN..COMMIT", samples=times["raw outbox"])
        )  # fmt: skip
        if "raw one statement" in times:
            one = times["raw one statement"]
            record(
                Row("capture", f"{vendor} raw SQL INSERT + event, one statement",
                    n / median(one), "rows/s", ratio=median(one) / median(times["raw autocommit"]),
                    ratio_of="floor, one statement", samples=one)
            )  # fmt: skip
        print(
            f"    statements per save (create/update, BEGIN and COMMIT included): "
            f"Plain {counts['Plain']}, Country {counts['Country']}",
            flush=True,
        )


# ------------------------------------------------------------------ 2. apply


def _ceiling_django(rows: Sequence[tuple[int, str, str]]) -> None:
    """Django's own bulk upsert of the rows: instances built from plain tuples (apply
    has to build them too), one transaction per page like apply, not captured."""
    from django.db import transaction

    import changefeed_sync
    from tests.testapp.models import Copy

    with changefeed_sync.applying():
        for begin in range(0, len(rows), PAGE):
            with transaction.atomic(using=TARGET):
                Copy.objects.using(TARGET).bulk_create(
                    [
                        Copy(language_id=lang, key=key, value=value)
                        for lang, key, value in rows[begin : begin + PAGE]
                    ],
                    update_conflicts=True,
                    unique_fields=["language", "key"],
                    update_fields=["value"],
                    batch_size=500,
                )


def _ceiling_sql(rows: Sequence[tuple[int, str, str]]) -> None:
    """The storage's own limit: multi-row INSERT ... ON CONFLICT DO UPDATE ... RETURNING,
    200 rows a statement, one transaction per page, no model instances."""
    from django.db import connections, transaction

    from tests.testapp.models import Copy

    connection = connections[TARGET]
    qn = connection.ops.quote_name
    given = ["language_id", "key", "value"]
    # Columns the rows do not set get their model default, so the statement follows the model.
    others = [f for f in Copy._meta.concrete_fields if not f.primary_key and f.attname not in given]
    defaults = [f.get_db_prep_save(f.get_default(), connection) for f in others]
    columns = ", ".join(qn(c) for c in [*given, *(str(f.column) for f in others)])
    placeholders = "(" + ", ".join(["%s"] * (len(given) + len(others))) + ")"
    head = f"INSERT INTO {qn(Copy._meta.db_table)} ({columns}) VALUES "
    tail = (
        f" ON CONFLICT ({qn('language_id')}, {qn('key')}) DO UPDATE SET "
        f"{qn('value')} = EXCLUDED.{qn('value')} RETURNING {qn('id')}"
    )
    for begin in range(0, len(rows), PAGE):
        page = rows[begin : begin + PAGE]
        with transaction.atomic(using=TARGET), connection.cursor() as cursor:
            for start in range(0, len(page), 200):
                chunk = page[start : start + 200]
                cursor.execute(
                    head + ", ".join([placeholders] * len(chunk)) + tail,
                    [part for row in chunk for part in (*row, *defaults)],
                )
                cursor.fetchall()


def bench_apply(sizes: Sizes) -> None:
    from changefeed_sync.models import DataSource
    from tests.testapp.models import Copy

    n_rows = N_COUNTRIES * N_LANGUAGES * sizes.keys_per_language
    print(
        f"\n[apply] {N_COUNTRIES} countries x {N_LANGUAGES} languages x "
        f"{sizes.keys_per_language} keys = {n_rows:,} Copy rows, then {sizes.updates:,} edits; "
        f"SQLite -> SQLite, pages of {PAGE}, {sizes.apply_reps} repetitions",
        flush=True,
    )

    # The source: every row written through the ORM and captured as events.
    wipe_synced(SOURCE)
    start = last_event_id(SOURCE)
    t0 = time.perf_counter()
    src_languages = seed_parents(SOURCE, capture=True)
    specs = copy_specs(src_languages, "new", n_rows)
    create_copies(SOURCE, specs, capture=True)
    n_events = event_count(SOURCE)
    print(
        f"  source: {n_events:,} events captured by bulk_create in "
        f"{time.perf_counter() - t0:.1f} s (one run, for information)",
        flush=True,
    )
    check(
        n_events == N_COUNTRIES + N_COUNTRIES * N_LANGUAGES + n_rows,
        f"{n_events} events captured for {n_rows} rows",
    )

    cases = {"empty target": 0, f"target with {sizes.prefill:,} rows": sizes.prefill}
    walls: dict[str, list[float]] = {name: [] for name in (*cases, "django", "sql")}
    cpus: dict[str, list[float]] = {name: [] for name in walls}
    reads: dict[str, list[float]] = {case: [] for case in cases}
    applies: dict[str, list[float]] = {case: [] for case in cases}
    for rep in range(sizes.apply_reps):
        # Alternate the order, so that drifting load favours no case.
        order = [*cases, "django", "sql"]
        for name in order if rep % 2 == 0 else reversed(order):
            wipe_synced(TARGET)
            if name in cases:
                prefill = cases[name]
                if prefill:
                    tgt_languages = seed_parents(TARGET, capture=False)
                    create_copies(TARGET, copy_specs(tgt_languages, "old", prefill), capture=False)
                ds = new_data_source(TARGET, start)
                with timed(walls[name], cpus[name]):
                    applied = pump(ds, read_times=reads[name], apply_times=applies[name])
                check(applied == n_events, f"applied {applied} of {n_events} events")
                expected = prefill + n_rows
            else:
                tgt_languages = seed_parents(TARGET, capture=False)
                # Seeded in the same order on both sides: the i-th language is the same one.
                lang_map = {s.pk: t.pk for s, t in zip(src_languages, tgt_languages)}
                rows = [(lang_map[lang], key, value) for lang, key, value in specs]
                with timed(walls[name], cpus[name]):
                    (_ceiling_django if name == "django" else _ceiling_sql)(rows)
                expected = n_rows
            count = Copy.objects.using(TARGET).count()
            check(count == expected, f"{name}: target holds {count} rows, expected {expected}")
            lang, key, value = specs[-1]
            check(
                Copy.objects.using(TARGET).filter(key=key, value=value).exists(),
                f"{name}: row {key} missing on the target",
            )

    # Edits: events updating random existing rows, in random order, applied to a target
    # that holds every row (the everyday incremental sync; a page touches many keys
    # across many languages).
    walls["updates"], cpus["updates"] = [], []
    reads["updates"], applies["updates"] = [], []
    wipe_synced(TARGET)
    tgt_languages = seed_parents(TARGET, capture=False)
    lang_map = {s.pk: t.pk for s, t in zip(src_languages, tgt_languages)}
    create_copies(
        TARGET, [(lang_map[lang], key, value) for lang, key, value in specs], capture=False
    )
    mid = last_event_id(SOURCE)
    edited = list(
        Copy.objects.using(SOURCE).filter(
            pk__in=random.Random(2).sample(
                list(Copy.objects.using(SOURCE).values_list("pk", flat=True)), sizes.updates
            )
        )
    )
    random.Random(3).shuffle(edited)
    for obj in edited:
        obj.value = f"Edited text of {obj.key}."
    Copy.objects.using(SOURCE).bulk_update(edited, ["value"], batch_size=500)
    check(event_count(SOURCE) == n_events + sizes.updates, "updates were not captured one each")
    ds = new_data_source(TARGET, mid)
    for _ in range(sizes.apply_reps):
        # Applying the same edits again does the same work: every write is an upsert.
        DataSource.objects.using(TARGET).filter(pk=ds.pk).update(checkpoint=mid)
        ds.checkpoint = mid
        with timed(walls["updates"], cpus["updates"]):
            applied = pump(ds, read_times=reads["updates"], apply_times=applies["updates"])
        check(applied == sizes.updates, f"applied {applied} of {sizes.updates} edits")
        arrived = Copy.objects.using(TARGET).filter(value__startswith="Edited text of ").count()
        check(arrived == sizes.updates, f"{arrived} of {sizes.updates} edits arrived")

    def rate(name: str, n: int) -> tuple[float, float]:
        return n / median(walls[name]), n / median(cpus[name])

    django_rate, django_cpu = rate("django", n_rows)
    counts = {**{case: n_events for case in cases}, "updates": sizes.updates}
    labels = {
        **{case: case for case in cases},
        "updates": f"edits of random rows, {n_rows:,}-row table",
    }
    for case, n in counts.items():
        label = labels[case]
        wall, cpu = rate(case, n)
        record(
            Row("apply", f"read+apply, {label}", wall, "events/s", per_cpu=cpu,
                ratio=wall / django_rate, ratio_of="vs Django bulk_create",
                target=">= 40,000", ok=wall >= 40_000, samples=walls[case])
        )  # fmt: skip
        record(
            Row("apply", "  of which feed.read", median(reads[case]), "s",
                samples=reads[case])
        )  # fmt: skip
        record(
            Row("apply", "  of which apply_page", median(applies[case]), "s",
                samples=applies[case])
        )  # fmt: skip
    record(
        Row("apply", "ceiling: Django bulk_create(update_conflicts)", django_rate, "rows/s",
            per_cpu=django_cpu, samples=walls["django"])
    )  # fmt: skip
    sql_rate, sql_cpu = rate("sql", n_rows)
    record(
        Row("apply", "floor of the storage: raw SQL upsert", sql_rate, "rows/s", per_cpu=sql_cpu,
            ratio=django_rate / sql_rate, ratio_of="Django bulk_create vs raw",
            samples=walls["sql"])
    )  # fmt: skip
    wipe_synced(TARGET)
    wipe_synced(SOURCE)


def bench_fallback(sizes: Sizes) -> None:
    """Pages that can be applied merged against pages that need the events' own order
    (each page here hands unique values on between rows: a swap per pair of rows in one
    transaction), the same number of events of the same model (Nation) either way."""
    from django.db import transaction

    import changefeed_sync
    from changefeed_sync.models import DataSource, Event
    from tests.testapp.models import Nation, Region

    n = sizes.fallback_rows
    print(
        f"\n[apply fallback] {n:,} Nation rows; {n * 3 // 2:,} edits as merged pages "
        f"(names) against {n * 3 // 2:,} as swaps of a unique field (event order); "
        f"SQLite -> SQLite, pages of {PAGE}, {sizes.apply_reps} repetitions",
        flush=True,
    )
    for alias in (SOURCE, TARGET):
        wipe(alias, Nation.neighbours.through, Region, Nation, Event, DataSource)
    start = last_event_id(SOURCE)
    Nation.objects.using(SOURCE).bulk_create(
        [Nation(code=f"N{i:05d}", alpha_3=f"A{i:05d}", numeric=i) for i in range(n)]
    )
    pump(new_data_source(TARGET, start))
    nations = list(Nation.objects.using(SOURCE).order_by("code"))
    # Merged: names edited, 3 events for every 2 rows (as many events as the swaps).
    merged_from = last_event_id(SOURCE)
    for step in range(3):
        for obj in nations[step % 2 :: 2][: n // 2]:
            obj.name = f"Name {step} of {obj.code}"
        Nation.objects.using(SOURCE).bulk_update(nations[step % 2 :: 2][: n // 2], ["name"])
    swaps_from = last_event_id(SOURCE)
    for a, b in zip(nations[::2], nations[1::2]):
        with transaction.atomic(using=SOURCE):
            old_a, old_b = a.alpha_3, b.alpha_3
            a.alpha_3 = "T" + old_a
            a.save()
            b.alpha_3 = old_a
            b.save()
            a.alpha_3 = old_b
            a.save()
    swaps_to = last_event_id(SOURCE)
    n_merged = Event.objects.using(SOURCE).filter(id__gt=merged_from, id__lte=swaps_from).count()
    n_swaps = Event.objects.using(SOURCE).filter(id__gt=swaps_from).count()
    check(n_merged == n_swaps == n // 2 * 3, f"{n_merged} / {n_swaps} events captured")

    def rewind() -> None:
        # The target as it was before the edits: every row back to its first values.
        from django.db.models import F, Value
        from django.db.models.functions import Concat

        with transaction.atomic(using=TARGET), changefeed_sync.applying():
            Nation.objects.using(TARGET).update(alpha_3=Concat(Value("t"), F("code")), name="")
            for pk, code in Nation.objects.using(TARGET).values_list("pk", "code"):
                Nation.objects.using(TARGET).filter(pk=pk).update(alpha_3=f"A{code[1:]}")

    def apply_range(since: int, until: int) -> int:
        from changefeed_sync.source import feed
        from changefeed_sync.target.apply import apply_page

        ds = DataSource.objects.using(TARGET).get()
        DataSource.objects.using(TARGET).filter(pk=ds.pk).update(checkpoint=since)
        ds.checkpoint = since
        applied = 0
        while ds.checkpoint < until:
            page = feed.read(ds.checkpoint, PAGE, using=SOURCE)
            events = [e for e in page.events if e["seq"] <= until]
            last = events[-1]["seq"] if events else until
            stats = apply_page(ds, events, since=page.since, last_seq=last, using=TARGET)
            check(stats is not None, "checkpoint moved under the benchmark")
            applied += len(events)
        return applied

    walls: dict[str, list[float]] = {"merged": [], "event order": []}
    cpus: dict[str, list[float]] = {"merged": [], "event order": []}
    ranges = {"merged": (merged_from, swaps_from), "event order": (swaps_from, swaps_to)}
    for rep in range(sizes.apply_reps):
        order = ["merged", "event order"] if rep % 2 == 0 else ["event order", "merged"]
        for name in order:
            rewind()
            with timed(walls[name], cpus[name]):
                applied = apply_range(*ranges[name])
            check(applied == n_merged, f"{name}: applied {applied} events")
            if name == "merged":
                names = Nation.objects.using(TARGET).filter(name__startswith="Name ").count()
                check(names == n // 2 * 2, f"{names} names arrived")
                continue
            source = dict(Nation.objects.using(SOURCE).values_list("code", "alpha_3"))
            target = dict(Nation.objects.using(TARGET).values_list("code", "alpha_3"))
            check(source == target, "the swaps did not arrive")
    merged_rate = n_merged / median(walls["merged"])
    record(
        Row("fallback", "merged pages (names)", merged_rate, "events/s",
            per_cpu=n_merged / median(cpus["merged"]), samples=walls["merged"])
    )  # fmt: skip
    order_rate = n_swaps / median(walls["event order"])
    record(
        Row("fallback", "pages needing event order (swaps)", order_rate, "events/s",
            per_cpu=n_swaps / median(cpus["event order"]), ratio=merged_rate / order_rate,
            ratio_of="merged vs event order", samples=walls["event order"])
    )  # fmt: skip
    for alias in (SOURCE, TARGET):
        wipe(alias, Nation.neighbours.through, Region, Nation, Event, DataSource)


# ------------------------------------------------------------------ 3. O(changes)


def _in_step(source: str, target: str, size: int) -> Any:
    """Source and target holding the same ``size`` rows, the target's checkpoint at the
    source's newest event: the state an incremental sync starts from. (Written directly
    on both sides: capture and apply of the initial rows are what section 2 measures.)"""
    from tests.testapp.models import Copy

    for alias in (source, target):
        wipe_synced(alias)
        languages = seed_parents(alias, capture=False)
        create_copies(alias, copy_specs(languages, "row", size), capture=False)
    check(Copy.objects.using(target).count() == size, f"target not in step at {size} rows")
    return new_data_source(target, last_event_id(source))


def _change_and_sync(
    ds: Any,
    source: str,
    target: str,
    pks: Sequence[int],
    k: int,
    rng: random.Random,
    label: str,
    saves: list[float],
    syncs: list[float],
) -> None:
    from tests.testapp.models import Copy

    value = f"changed: {label}"
    objs = list(Copy.objects.using(source).filter(pk__in=rng.sample(pks, k)))
    with timed(saves):
        for obj in objs:
            obj.value = value
            obj.save(using=source)  # autocommit: each save its own transaction
    with timed(syncs):
        applied = pump(ds, source, target)
    check(applied == k, f"sync applied {applied} events, expected {k}")
    arrived = Copy.objects.using(target).filter(key__in=[o.key for o in objs], value=value).count()
    check(arrived == k, f"{arrived} of {k} changes arrived")


def bench_ochanges(sizes: Sizes) -> None:
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from tests.testapp.models import Copy

    k = sizes.ochanges_changes
    small, large = sizes.ochanges_small, sizes.ochanges_large
    print(
        f"\n[ochanges] incremental sync of {k} updated Copy rows, SQLite -> SQLite, tables of "
        f"{small:,} and {large:,} rows measured in alternation, {sizes.ochanges_reps} repetitions",
        flush=True,
    )
    pairs = {small: (SMALL_SOURCE, SMALL_TARGET), large: (SOURCE, TARGET)}
    sources = {size: _in_step(*pair, size) for size, pair in pairs.items()}
    pks = {
        size: list(Copy.objects.using(pair[0]).values_list("pk", flat=True))
        for size, pair in pairs.items()
    }
    rng = random.Random(1)
    saves: dict[int, list[float]] = {small: [], large: []}
    syncs: dict[int, list[float]] = {small: [], large: []}
    for rep in range(sizes.ochanges_reps + 2):  # two warm-ups, not kept
        for size in (small, large) if rep % 2 == 0 else (large, small):
            kept = rep >= 2
            _change_and_sync(
                sources[size],
                *pairs[size],
                pks[size],
                k,
                rng,
                f"rep {rep}",
                saves[size] if kept else [],
                syncs[size] if kept else [],
            )
    # What the saves and one sync send to the databases (outside the timings).
    queries: dict[int, tuple[int, int, int]] = {}
    for size, (source, target) in pairs.items():
        objs = list(Copy.objects.using(source).filter(pk__in=rng.sample(pks[size], k)))
        with CaptureQueriesContext(connections[source]) as saves_q:
            for obj in objs:
                obj.value = "counted"
                obj.save(using=source)
        with (
            CaptureQueriesContext(connections[source]) as feed_q,
            CaptureQueriesContext(connections[target]) as apply_q,
        ):
            check(pump(sources[size], source, target) == k, "counted sync")
        queries[size] = (len(saves_q), len(feed_q), len(apply_q))
    for size in (small, large):
        record(
            Row(
                "ochanges",
                f"{k} source saves, table {size:,} rows",
                median(saves[size]) * 1000,
                "ms",
                samples=saves[size],
            )
        )
        record(
            Row(
                "ochanges",
                f"sync of {k} changes, table {size:,} rows",
                median(syncs[size]) * 1000,
                "ms",
                samples=syncs[size],
            )
        )
    ratio = median(syncs[large]) / median(syncs[small])
    record(
        Row(
            "ochanges",
            f"sync, {large:,} rows vs {small:,} rows",
            median(syncs[large]) * 1000,
            "ms",
            ratio=ratio,
            ratio_of="large/small table time",
            target="<= 1.5x",
            ok=ratio <= 1.5,
        )
    )
    for size, (saves_q, feed_q, apply_q) in queries.items():
        print(
            f"    table {size:,}: {k} Copy saves sent {saves_q} statements (BEGIN/COMMIT included); "
            f"one sync sent {feed_q} to the source and {apply_q} to the target",
            flush=True,
        )


# ------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    global PROFILER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--only", choices=["capture", "apply", "ochanges"], help="run one section")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the timed regions (cProfile) and print the top functions",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.profile:
        PROFILER = cProfile.Profile()

    aliases = setup_databases()
    try:
        print(
            f"changefeed_sync benchmarks, {'quick' if args.quick else 'full'} mode; "
            f"Python {sys.version.split()[0]}, Django {django.get_version()}, "
            f"SQLite {sqlite3.sqlite_version}"
            + (", PostgreSQL " + _pg_version() if POSTGRES in aliases else "")
            + f"; {os.cpu_count()} CPUs, load average {_load()}",
            flush=True,
        )
        load_before = _load()
        started = time.perf_counter()
        if args.only in (None, "capture"):
            bench_capture(aliases, sizes)
        if args.only in (None, "apply"):
            bench_apply(sizes)
            bench_fallback(sizes)
        if args.only in (None, "ochanges"):
            bench_ochanges(sizes)
        print(
            f"\nResults ({'quick' if args.quick else 'full'} mode, medians, "
            f"{time.perf_counter() - started:.0f} s; load average {load_before} before, "
            f"{_load()} after):\n"
        )
        print(table())
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(
                    {
                        "mode": "quick" if args.quick else "full",
                        "sizes": asdict(sizes),
                        "results": [asdict(r) for r in RESULTS],
                    },
                    fh,
                    indent=2,
                )
            print(f"\nwritten to {args.json}")
        if PROFILER is not None:
            print("\nProfile of the timed regions, top 30 by own time:")
            pstats.Stats(PROFILER).sort_stats("tottime").print_stats(30)
    finally:
        teardown(aliases)
    missed = [r.case.strip() for r in RESULTS if r.ok is False]
    print("\ntargets missed: " + ("; ".join(missed) if missed else "none"))
    return 0


def _load() -> str:
    """The 1-minute load average: figures taken while other work ran are noisier."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _pg_version() -> str:
    from django.db import connections

    with connections[POSTGRES].cursor() as cursor:
        cursor.execute("SHOW server_version")
        return str(cursor.fetchone()[0])


if __name__ == "__main__":
    sys.exit(main())
