"""Full Data Pull benchmark: real HTTP between real processes, against dumpdata + loaddata.

    .venv-django6/bin/python bench/pull.py                  # 100k rows, SQLite and PostgreSQL; memory at 1M
    .venv-django6/bin/python bench/pull.py --quick          # 10k rows, memory at 50k: a smoke run
    .venv-django6/bin/python bench/pull.py --rows 200000 --large-rows 2000000
    .venv-django6/bin/python bench/pull.py --backends sqlite --no-memory --profile

For each backend (SQLite -> SQLite, PostgreSQL -> PostgreSQL), in one run:

1. a source database holding ``--rows`` Copy rows (10 countries x 5 languages x
   rows/50 keys, the README's models), served over HTTP by a threaded WSGI server in
   its own process (``--role serve``);
2. a full pull into an empty target database, in its own process (``--role pull``),
   through ``changefeed_sync.target.pull.execute`` exactly as ``manage.py changefeed_pull``
   runs it; then a second pull with nothing changed (compared by digests: no row
   travels); ``--reps`` times (3; the target emptied in between), medians reported,
   with the CPU time of both processes (wall time on a shared 2-core machine moves
   with the load of everything else; the load average is printed before and after);
   then, once, a re-pull after 100 rows changed on the source (80 updated, 10
   deleted, 10 inserted), whose counts are checked;
3. ``dumpdata --natural-foreign --natural-primary`` of the source and ``loaddata``
   of that file into a third, empty database (the issue's reference), and, to be fair
   to Django, the same without natural keys (primary keys kept);
4. memory: the peak RSS (``VmHWM``) of the server process and of the pull processes
   (first pulls and re-pulls) at ``--rows`` and at ``--large-rows`` (a first pull and a
   re-pull there), each size served and pulled by fresh processes.

Targets (issue 3): >= 30,000 rows/s SQLite -> SQLite and >= 30x dumpdata + loaddata;
a re-pull with nothing changed >= 3x faster than the first pull; peak memory of each
process at the large size <= 1.2x its peak at the base size.

The models are the bench's own copies of the README's Country / Language / Copy
(``app_label = "bench"``), with Django's ``natural_key()`` / ``get_by_natural_key()``,
which ``dumpdata --natural-primary`` needs and the test app's models do not define.
Databases: SQLite files in a temporary directory, PostgreSQL databases
``bench_pull_<pid>_*`` on the server named by ``CFS_PG_HOST`` / ``CFS_PG_PORT`` /
``CFS_PG_USER`` / ``CFS_PG_PASSWORD`` (``CFS_BENCH_PG=0`` leaves PostgreSQL out); all
are removed at exit. ``CFS_BENCH_PAGE_SIZE=N`` makes the pull ask for pages of N rows
(``CHANGEFEED_SYNC_PULL_PAGE_SIZE``; the source caps it at its feed limit, 5000).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import resource
import select
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

from django.apps import AppConfig

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import pg  # noqa: E402

N_COUNTRIES = 10
N_LANGUAGES = 5  # per country
SECRET = "bench-secret"
CLIENT = "bench-target"


# ------------------------------------------------------------------ databases and settings


def database(spec: str) -> dict[str, Any]:
    """``sqlite:PATH`` or ``postgres:DBNAME`` -> a DATABASES entry."""
    kind, _, name = spec.partition(":")
    if kind == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name, "OPTIONS": {"timeout": 60}}
    if kind == "postgres":
        return {"ENGINE": "django.db.backends.postgresql", "NAME": name, **pg.server()}
    raise ValueError(f"unknown database spec {spec!r}")


def configure(databases: dict[str, str]) -> None:
    """Django settings for one process of the bench, then the bench's models."""
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
        **(
            {"CHANGEFEED_SYNC_PULL_PAGE_SIZE": int(os.environ["CFS_BENCH_PAGE_SIZE"])}
            if os.environ.get("CFS_BENCH_PAGE_SIZE")
            else {}
        ),
    )
    django.setup()
    register()


_MODELS: dict[str, Any] = {}


class BenchConfig(AppConfig):
    """The bench's app: its models are defined here, not in a models.py."""

    name = "bench"
    label = "bench"

    def import_models(self) -> None:
        _MODELS.update(_define_models())
        self.models = self.apps.all_models[self.label]
        self.models_module = sys.modules[__name__]  # dumpdata and syncdb look for one


def bench_models() -> dict[str, Any]:
    return _MODELS


def _define_models() -> dict[str, Any]:
    """Country, Language, Copy as in the README, with Django's natural key protocol."""
    from django.db import models

    class CountryManager(models.Manager["Country"]):
        def get_by_natural_key(self, code: str) -> Country:
            return self.get(code=code)

    class Country(models.Model):
        code = models.CharField(max_length=2, unique=True)
        name = models.CharField(max_length=100, default="")
        objects = CountryManager()

        class Meta:
            app_label = "bench"

        def __str__(self) -> str:
            return self.code

        def natural_key(self) -> tuple[str]:
            return (self.code,)

    class LanguageManager(models.Manager["Language"]):
        def get_by_natural_key(self, country: str, code: str) -> Language:
            return self.get(country__code=country, code=code)

    class Language(models.Model):
        country = models.ForeignKey(Country, on_delete=models.CASCADE)
        code = models.CharField(max_length=2)
        name = models.CharField(max_length=100, default="")
        objects = LanguageManager()

        class Meta:
            app_label = "bench"
            unique_together = [("country", "code")]

        def __str__(self) -> str:
            return self.code

        def natural_key(self) -> tuple[str, str]:
            return (self.country.code, self.code)

        natural_key.dependencies = ["bench.country"]  # type: ignore[attr-defined]

    class CopyManager(models.Manager["Copy"]):
        def get_by_natural_key(self, country: str, language: str, key: str) -> Copy:
            return self.get(language__country__code=country, language__code=language, key=key)

    class Copy(models.Model):
        language = models.ForeignKey(Language, on_delete=models.CASCADE)
        key = models.CharField(max_length=255)
        value = models.TextField(default="")
        objects = CopyManager()

        class Meta:
            app_label = "bench"
            constraints = [
                models.UniqueConstraint(fields=["language", "key"], name="bench_copy_lang_key")
            ]

        def __str__(self) -> str:
            return self.key

        def natural_key(self) -> tuple[str, str, str]:
            return (*self.language.natural_key(), self.key)

        natural_key.dependencies = ["bench.language"]  # type: ignore[attr-defined]

    return {"Country": Country, "Language": Language, "Copy": Copy}


def register() -> None:
    """Register the models as the README does."""
    import changefeed_sync

    m = _MODELS
    changefeed_sync.register(m["Country"], natural_key=["code"])
    changefeed_sync.register(m["Language"], natural_key=["country.code", "code"])
    changefeed_sync.register(
        m["Copy"],
        natural_key=["language.country.code", "language.code", "key"],
        fields=("value", "key", "language"),
    )


# ------------------------------------------------------------------ the child processes


def peak_rss_kb() -> int:
    """This process's peak resident set, in KiB.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``, which Linux carries
    over a fork and an exec: a child started by a big parent would report the
    parent's peak. Elsewhere ``ru_maxrss`` is all there is.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for status in fh:
                if status.startswith("VmHWM:"):
                    return int(status.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def role_serve(db: str) -> None:
    """A source site: ``changefeed_sync.urls`` at the root, threaded WSGI, quiet."""
    configure({"default": db})
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    def report_and_exit(signum: int, frame: Any) -> None:
        sys.stdout.write(json.dumps({"maxrss_kb": peak_rss_kb()}) + "\n")
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, report_and_exit)
    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
    server.set_app(WSGIHandler())
    sys.stdout.write(f"{server.server_port}\n")
    sys.stdout.flush()
    server.serve_forever()


def role_pull(db: str, url: str, profile: str | None) -> None:
    """One Data Pull into ``db``, as ``manage.py changefeed_pull`` runs it; prints JSON."""
    configure({"default": db})
    import cProfile

    from changefeed_sync import rows
    from changefeed_sync.models import DataPull, DataSource
    from changefeed_sync.target.pull import execute

    rows.allow_collection_pauses()  # as manage.py changefeed_pull does

    source, _ = DataSource.objects.get_or_create(
        name="bench", defaults={"url": url, "client_name": CLIENT, "secrets": SECRET}
    )
    pull = DataPull.objects.create(source=source)
    profiler = cProfile.Profile() if profile else None
    cpu = time.process_time()
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    pull = execute(pull)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    result = {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "status": pull.status,
        "error": pull.error,
        "counts": pull.counts,
        "maxrss_kb": peak_rss_kb(),
    }
    sys.stdout.write(json.dumps(result) + "\n")


class Server:
    """The source's server process."""

    def __init__(self, db: str, logdir: Path) -> None:
        self.log = open(logdir / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--role", "serve", "--db", db],
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else b""
        if not line.strip():
            self.process.kill()
            raise RuntimeError(f"source server did not start; see {logdir / 'server.log'}")
        self.url = f"http://127.0.0.1:{int(line)}/"

    def cpu(self) -> float:
        """CPU seconds the server has used so far (Linux /proc; NaN elsewhere)."""
        try:
            with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        """Stop it; return its peak RSS in KiB."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGTERM)
        line = self.process.stdout.readline()
        self.process.wait(30)
        self.process.stdout.close()
        self.log.close()
        return int(json.loads(line)["maxrss_kb"]) if line.strip() else 0


def run_pull_process(db: str, url: str, logdir: Path, profile: str | None = None) -> dict[str, Any]:
    args = [sys.executable, __file__, "--role", "pull", "--db", db, "--url", url]
    if profile:
        args += ["--profile-to", profile]
    with open(logdir / "pull.log", "ab") as log:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"pull process failed ({done.returncode}); see {logdir / 'pull.log'}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    if result["status"] != "succeeded":
        raise RuntimeError(f"pull failed: {result['error']}")
    return result


# ------------------------------------------------------------------ the orchestrator


@dataclass
class Figures:
    backend: str
    rows: int
    pull_s: float = 0.0
    pull_cpu: float = 0.0
    source_cpu: float = 0.0
    repull_s: float = 0.0
    repull_cpu: float = 0.0
    repull_source_cpu: float = 0.0
    dump_s: float = 0.0
    load_s: float = 0.0
    dump_pk_s: float = 0.0
    load_pk_s: float = 0.0
    server_kb: int = 0
    pull_kb: int = 0
    large_rows: int = 0
    large_pull_s: float = 0.0
    large_repull_s: float = 0.0
    changed_s: float = 0.0
    large_server_kb: int = 0
    large_pull_kb: int = 0
    samples: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))


def seed(alias: str, rows: int) -> None:
    """The source's rows, written directly (no outbox events: the pull does not need them)."""
    from django.db import transaction

    import changefeed_sync

    m = bench_models()
    per_language = max(1, rows // (N_COUNTRIES * N_LANGUAGES))
    with changefeed_sync.applying(), transaction.atomic(using=alias):
        countries = (
            m["Country"]
            .objects.using(alias)
            .bulk_create(
                [m["Country"](code=f"c{i}", name=f"Country {i}") for i in range(N_COUNTRIES)]
            )
        )
        languages = (
            m["Language"]
            .objects.using(alias)
            .bulk_create(
                [
                    m["Language"](country=c, code=f"l{j}", name=f"Language {j} of {c.code}")
                    for c in countries
                    for j in range(N_LANGUAGES)
                ]
            )
        )
    batch = []
    for k in range(per_language):
        for lang in languages:
            batch.append(
                m["Copy"](
                    language_id=lang.pk,
                    key=f"page{k // 100}.section.key{k:07d}",
                    value=f"Translated text number {k} for {lang.code}, a sentence of some length.",
                )
            )
        if len(batch) >= 20_000:
            _write(alias, batch)
            batch = []
    _write(alias, batch)


def _write(alias: str, batch: list[Any]) -> None:
    from django.db import transaction

    import changefeed_sync

    if batch:
        with changefeed_sync.applying(), transaction.atomic(using=alias):
            bench_models()["Copy"].objects.using(alias).bulk_create(batch, batch_size=1000)


def check_same(source: str, target: str, rows: int) -> None:
    """Every Copy row arrived, with its value (compared as sorted (key, value) digests)."""
    import hashlib

    m = bench_models()

    def digest(alias: str) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        rows_ = (
            m["Copy"]
            .objects.using(alias)
            .order_by("language__country__code", "language__code", "key")
            .values_list("language__country__code", "language__code", "key", "value")
        )
        for row in rows_.iterator(chunk_size=10_000):
            h.update(repr(row).encode())
            n += 1
        return n, h.hexdigest()

    got, want = digest(target), digest(source)
    if got != want or want[0] < rows * 0.99:
        raise RuntimeError(f"target differs from source: {got} vs {want}")


def wipe_target(alias: str) -> None:
    """Empty the target's synced tables and pull records, children first."""
    from django.db import connections, transaction

    from changefeed_sync.models import DataPull, DataSource

    m = bench_models()
    connection = connections[alias]
    tables = [x._meta.db_table for x in (m["Copy"], m["Language"], m["Country"], DataPull,
                                          DataSource)]  # fmt: skip
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"DELETE FROM {connection.ops.quote_name(table)}")
    connection.close()


def migrate(alias: str) -> None:
    from django.core.management import call_command

    call_command("migrate", database=alias, run_syncdb=True, verbosity=0, interactive=False)


def bench_backend(
    backend: str, rows: int, large: int, workdir: Path, profile: bool, baseline: bool, reps: int
) -> Figures:
    from django.db import connections

    from changefeed_sync.models import Target

    fig = Figures(backend, rows)
    specs = specs_for(backend, workdir)
    a = {name.removeprefix(f"{backend}_"): name for name in specs}  # role -> alias
    for alias in specs:
        migrate(alias)
    t = time.perf_counter()
    seed(a["source"], rows)
    Target.objects.using(a["source"]).create(name=CLIENT, secrets=SECRET)
    print(f"  seeded {rows:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
    for alias in connections:
        connections[alias].close()

    server = Server(specs[a["source"]], workdir)
    firsts: list[float] = []
    repulls: list[float] = []
    try:
        for rep in range(reps):
            if rep:
                wipe_target(a["target"])
            prof = str(workdir / f"pull-{backend}.prof") if profile and not rep else None
            cpu = server.cpu()
            first = run_pull_process(specs[a["target"]], server.url, workdir, prof)
            source_cpu = server.cpu() - cpu
            firsts.append(first["seconds"])
            fig.pull_kb = max(fig.pull_kb, first["maxrss_kb"])
            created = first["counts"]["bench.copy"]["created"]
            print(f"  first pull: {rows / first['seconds']:,.0f} rows/s ({first['seconds']:.2f} s, "
                  f"{created:,} Copy rows created; CPU: pull process {first['cpu']:.2f} s, "
                  f"source server {source_cpu:.2f} s)", flush=True)  # fmt: skip
            if prof:
                print_profile(prof)
            cpu = server.cpu()
            second = run_pull_process(specs[a["target"]], server.url, workdir)
            repull_source_cpu = server.cpu() - cpu
            repulls.append(second["seconds"])
            unchanged = second["counts"]["bench.copy"]["unchanged"]
            print(f"  re-pull, nothing changed: {second['seconds']:.2f} s ({unchanged:,} unchanged;"
                  f" CPU: pull process {second['cpu']:.2f} s, source server "
                  f"{repull_source_cpu:.2f} s)", flush=True)  # fmt: skip
            fig.pull_kb = max(fig.pull_kb, second["maxrss_kb"])
            if not rep:
                fig.pull_cpu, fig.source_cpu = first["cpu"], source_cpu
                fig.repull_cpu, fig.repull_source_cpu = second["cpu"], repull_source_cpu
        # A re-pull after a few changes: only the buckets that differ travel.
        expected = change_source(a["source"], CHANGED)
        for alias in connections:
            connections[alias].close()
        third = run_pull_process(specs[a["target"]], server.url, workdir)
        fig.pull_kb = max(fig.pull_kb, third["maxrss_kb"])
        fig.changed_s = third["seconds"]
        got = third["counts"]["bench.copy"]
        if got != expected:
            raise RuntimeError(f"re-pull after changes counted {got}, expected {expected}")
        print(f"  re-pull after {CHANGED} changes: {third['seconds']:.2f} s ({got})", flush=True)
    finally:
        fig.server_kb = server.stop()
    fig.pull_s, fig.repull_s = statistics.median(firsts), statistics.median(repulls)
    fig.samples = (firsts, repulls)
    check_same(a["source"], a["target"], rows)

    if not baseline:
        fig.dump_s = fig.load_s = fig.dump_pk_s = fig.load_pk_s = float("nan")
    else:
        baseline_runs(fig, a, workdir, rows)

    if large:
        fig.large_rows = large
        t = time.perf_counter()
        seed(a["large_source"], large)
        Target.objects.using(a["large_source"]).create(name=CLIENT, secrets=SECRET)
        print(f"  seeded {large:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
        for alias in connections:
            connections[alias].close()
        server = Server(specs[a["large_source"]], workdir)
        try:
            big = run_pull_process(specs[a["large_target"]], server.url, workdir)
            again = run_pull_process(specs[a["large_target"]], server.url, workdir)
        finally:
            fig.large_server_kb = server.stop()
        fig.large_pull_s = big["seconds"]
        fig.large_repull_s = again["seconds"]
        fig.large_pull_kb = max(big["maxrss_kb"], again["maxrss_kb"])
        print(f"  first pull of {large:,} rows: {large / fig.large_pull_s:,.0f} rows/s; "
              f"re-pull, nothing changed: {fig.large_repull_s:.2f} s", flush=True)  # fmt: skip
    return fig


CHANGED = 100  # rows changed on the source before the last re-pull


def change_source(alias: str, n: int) -> dict[str, int]:
    """Update 8/10 of ``n`` Copy rows, delete 1/10, insert 1/10, spread over the table;
    return the counts a re-pull must report."""
    from django.db import transaction

    import changefeed_sync

    m = bench_models()
    copies = m["Copy"].objects.using(alias)
    total = copies.count()
    pks = list(copies.order_by("pk").values_list("pk", flat=True)[:: max(1, total // n)][:n])
    updated, deleted = pks[: n * 8 // 10], pks[n * 8 // 10 : n * 9 // 10]
    language = m["Language"].objects.using(alias).order_by("pk").first()
    with changefeed_sync.applying(), transaction.atomic(using=alias):
        for pk in updated:
            copies.filter(pk=pk).update(value=f"changed {time.time()}")
        copies.filter(pk__in=deleted).delete()
        copies.bulk_create(
            [m["Copy"](language=language, key=f"new.{time.time()}.{i}", value="new")
             for i in range(n // 10)]  # fmt: skip
        )
    unchanged = total - len(updated) - len(deleted)
    return {"created": n // 10, "updated": len(updated), "deleted": len(deleted),
            "unchanged": unchanged}  # fmt: skip


def baseline_runs(fig: Figures, a: dict[str, str], workdir: Path, rows: int) -> None:
    """dumpdata + loaddata of the same rows, with natural keys and with primary keys.

    loaddata runs with changefeed_sync's capture off (``applying()``): the figure is
    Django's own cost, not Django's plus the outbox rows this app would write.
    """
    from django.core.management import call_command

    import changefeed_sync

    dump = workdir / f"dump-{fig.backend}.json"
    t = time.perf_counter()
    call_command("dumpdata", "bench", natural_foreign=True, natural_primary=True,
                 database=a["source"], output=str(dump), verbosity=0)  # fmt: skip
    fig.dump_s = time.perf_counter() - t
    t = time.perf_counter()
    with changefeed_sync.applying():
        call_command("loaddata", str(dump), database=a["load"], verbosity=0)
    fig.load_s = time.perf_counter() - t
    check_same(a["source"], a["load"], rows)
    print(f"  dumpdata --natural-foreign --natural-primary: {fig.dump_s:.1f} s, "
          f"loaddata: {fig.load_s:.1f} s", flush=True)  # fmt: skip
    t = time.perf_counter()
    call_command("dumpdata", "bench", database=a["source"], output=str(dump), verbosity=0)
    fig.dump_pk_s = time.perf_counter() - t
    t = time.perf_counter()
    with changefeed_sync.applying():
        call_command("loaddata", str(dump), database=a["load_pk"], verbosity=0)
    fig.load_pk_s = time.perf_counter() - t
    check_same(a["source"], a["load_pk"], rows)
    print(f"  dumpdata (primary keys): {fig.dump_pk_s:.1f} s, loaddata: {fig.load_pk_s:.1f} s",
          flush=True)  # fmt: skip
    dump.unlink()


def specs_for(backend: str, workdir: Path) -> dict[str, str]:
    """alias -> database spec, for every database of one backend."""
    names = ["source", "target", "load", "load_pk", "large_source", "large_target"]
    if backend == "sqlite":
        return {f"{backend}_{n}": f"sqlite:{workdir / f'{n}.sqlite3'}" for n in names}
    return {f"{backend}_{n}": f"postgres:bench_pull_{os.getpid()}_{n}" for n in names}


def print_profile(path: str) -> None:
    print("  profile of the first pull (pull process, main thread), top 25 by own time:")
    pstats.Stats(path).sort_stats("tottime").print_stats(25)
    print("  the same, top 40 by cumulative time:")
    pstats.Stats(path).sort_stats("cumtime").print_stats(40)


def report(figs: Sequence[Figures]) -> list[str]:
    missed = []
    print("\nResults")
    for f in figs:
        rate = f.rows / f.pull_s
        natural = f.rows / (f.dump_s + f.load_s)
        plain = f.rows / (f.dump_pk_s + f.load_pk_s)
        print(f"\n{f.backend} -> {f.backend}, {f.rows:,} Copy rows (+60 parents)")
        line("full pull over HTTP (median)", f"{rate:,.0f} rows/s",
             "s: " + ", ".join(f"{x:.2f}" for x in f.samples[0]),
             ">= 30,000 rows/s" if f.backend == "sqlite" else "", rate >= 30_000
             if f.backend == "sqlite" else None, missed)  # fmt: skip
        line("  CPU of a first pull: pull process, source server",
             f"{f.pull_cpu:.2f}, {f.source_cpu:.2f} s",
             f"{f.rows / f.pull_cpu:,.0f} and {f.rows / f.source_cpu:,.0f} rows per CPU-s", "",
             None, missed)  # fmt: skip
        line("  CPU of a re-pull: pull process, source server",
             f"{f.repull_cpu:.2f}, {f.repull_source_cpu:.2f} s", "", "", None, missed)  # fmt: skip
        if f.dump_s == f.dump_s:  # not NaN: the baseline ran
            line("dumpdata --natural-foreign --natural-primary + loaddata",
                 f"{natural:,.0f} rows/s", f"{f.dump_s:.1f} s + {f.load_s:.1f} s", "", None,
                 missed)  # fmt: skip
            line("  pull / dumpdata+loaddata", f"{rate / natural:.1f}x", "", ">= 30x",
                 rate / natural >= 30, missed)  # fmt: skip
            line("dumpdata + loaddata with primary keys", f"{plain:,.0f} rows/s",
                 f"{f.dump_pk_s:.1f} s + {f.load_pk_s:.1f} s", "", None, missed)  # fmt: skip
            line("  pull / dumpdata+loaddata (primary keys)", f"{rate / plain:.1f}x", "", "",
                 None, missed)  # fmt: skip
        line("re-pull, nothing changed (median)", f"{f.repull_s:.2f} s",
             f"{f.pull_s / f.repull_s:.1f}x faster than the first pull", ">= 3x",
             f.pull_s / f.repull_s >= 3, missed)  # fmt: skip
        line(f"re-pull after {CHANGED} changed rows (one run)", f"{f.changed_s:.2f} s",
             f"{f.pull_s / f.changed_s:.1f}x faster than the first pull", "", None,
             missed)  # fmt: skip
        if f.large_rows:
            for who, small, large in (("source server", f.server_kb, f.large_server_kb),
                                      ("pull process", f.pull_kb, f.large_pull_kb)):  # fmt: skip
                ratio = large / small if small else float("nan")
                line(f"peak RSS of the {who}, {f.large_rows:,} vs {f.rows:,} rows",
                     f"{ratio:.2f}x", f"{large / 1024:.0f} MiB vs {small / 1024:.0f} MiB",
                     "<= 1.2x", ratio <= 1.2, missed)  # fmt: skip
            line(f"full pull of {f.large_rows:,} rows", f"{f.large_rows / f.large_pull_s:,.0f} rows/s",
                 f"{f.large_pull_s:.1f} s", "", None, missed)  # fmt: skip
            line(f"re-pull of {f.large_rows:,} rows, nothing changed", f"{f.large_repull_s:.2f} s",
                 f"{f.large_pull_s / f.large_repull_s:.1f}x faster than the first pull", "",
                 None, missed)  # fmt: skip
    return missed


def line(what: str, value: str, detail: str, target: str, ok: bool | None,
         missed: list[str]) -> None:  # fmt: skip
    verdict = "" if ok is None else ("ok" if ok else "MISSED")
    if ok is False:
        missed.append(what.strip())
    print(f"  {what:<58} {value:>14}  {detail:<46} {target:<16} {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "serve", "pull"], default="main",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=None, help="Copy rows (default 100,000)")
    parser.add_argument("--large-rows", type=int, default=None,
                        help="rows for the memory comparison (default 10x --rows)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="10k rows, memory at 50k")
    parser.add_argument(
        "--reps", type=int, default=None, help="first pull + re-pull repetitions (default 3)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the large-size run")
    parser.add_argument("--backends", default="sqlite,postgres", help="sqlite,postgres")
    parser.add_argument("--profile", action="store_true", help="cProfile the first pull")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip dumpdata + loaddata (no ratios)"
    )
    args = parser.parse_args(argv)
    if args.role == "serve":
        role_serve(args.db)
        return 0
    if args.role == "pull":
        role_pull(args.db, args.url, args.profile_to)
        return 0

    rows = args.rows or (10_000 if args.quick else 100_000)
    reps = args.reps or (1 if args.quick else 3)
    large = 0 if args.no_memory else (args.large_rows or (50_000 if args.quick else 10 * rows))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "postgres" in backends:
        why = pg.unavailable()
        if why:
            print(f"PostgreSQL left out: {why}")
            backends.remove("postgres")
    workdir = Path(tempfile.mkdtemp(prefix="changefeed_sync-pull-bench-"))
    specs: dict[str, str] = {}
    for backend in backends:
        specs.update(specs_for(backend, workdir))
    pg_names = [v.partition(":")[2] for v in specs.values() if v.startswith("postgres:")]
    figs = []
    missed: list[str] = []
    try:
        for name in pg_names:
            pg.admin(f'DROP DATABASE IF EXISTS "{name}"')
            pg.admin(f'CREATE DATABASE "{name}"')
        import django

        configure({"default": next(iter(specs.values())), **specs})
        print(f"changefeed_sync pull bench: Python {sys.version.split()[0]}, Django "
              f"{django.get_version()}, {os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.2f}; {rows:,} rows"
              + (f", memory at {large:,}" if large else ""), flush=True)  # fmt: skip
        for backend in backends:
            print(f"\n[{backend} -> {backend}]", flush=True)
            figs.append(
                bench_backend(
                    backend, rows, large, workdir, args.profile, not args.no_baseline, reps
                )
            )
        missed = report(figs)
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    finally:
        try:
            from django.db import connections

            for alias in connections:
                connections[alias].close()
        except Exception:
            pass
        for name in pg_names:
            try:
                pg.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:
                print(f"could not drop {name}: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
    print("\ntargets missed: " + ("; ".join(missed) if missed else "none"))
    return 0


if __name__ == "__main__":
    # Run as the module bench.pull, the one INSTALLED_APPS names (not a second copy).
    from bench.pull import main as module_main

    sys.exit(module_main())
