"""Fan-out: one event written, time until every one of 100 Targets has it.

    .venv-django6/bin/python bench/fanout.py                      # 100 targets, 20 events per mode
    .venv-django6/bin/python bench/fanout.py --quick              # 20 targets, 5 events per mode
    .venv-django6/bin/python bench/fanout.py --modes inline,cloudtasks --targets 100 --events 20
    .venv-django6/bin/python bench/fanout.py --backend postgres   # the source on PostgreSQL
    .venv-django6/bin/python bench/fanout.py --json PATH

Modes, measured in the same run against the same receivers, taking turns event by
event (so that load from other processes drifting during the run favours none):

* ``before``: the inline backend as it was before the delivery pool (one thread per
  target and database plus a recorder thread per target), loaded from git
  (``git show REV:changefeed_sync/delivery/inline.py``, ``--before-rev``) as a
  module beside the current one. It runs on the current ``push.py`` (batches,
  signing, ``deliver_pending``), so only the scheduling differs;
* ``inline``: the current default backend (``changefeed_sync.source.delivery.inline``);
* ``cloudtasks``: the Cloud Tasks backend against gcloud-tasks-emulator
  (tests/emulator.py, its own virtualenv), which POSTs every task to its URL.
  The emulator dispatches tasks itself, one queue, from Python: its dispatch
  rate is not Google's (about 500 dispatches/s per queue), so the figure that
  speaks for the backend is the writer's time (creating the tasks happens in
  the committing thread, after commit); the arrival times show the emulator.

The source is this process: a site of tests/servers.py (its own SQLite file, or a
PostgreSQL database with ``--backend postgres``), migrated fresh, with ``--targets``
Targets whose webhook URLs point at the receivers. For every event it commits one
new Tag in its own transaction; the commit time is taken by a
``transaction.on_commit`` callback registered before the write, so it runs first
once the commit is durable (before deliveries are even scheduled). Events are
written one at a time: the next one only once every target has the previous one.
Each mode keeps one backend instance for the whole run, as a process does.

The receivers are a few lightweight HTTP servers (``--receivers``, 2 by default:
processes of their own, ``http.server`` with a thread per connection, keep-alive)
on loopback, serving every Target at its own path (``/hook/<target name>/``). Each
checks the request as a target site would before applying: the signature with
changefeed_sync's own ``signing.verify_request`` (the Target's secret, method, path,
body digest, age), and the body's framing (``since`` < ``last_seq``, the last
event's position); then it stamps the arrival with ``time.monotonic()`` (the
system-wide CLOCK_MONOTONIC, so stamps of different processes compare) and answers
200 ``{"status": "applied"}``. Why not target sites: 100 Django target sites would
need 100 databases and 100 servers on a 2-core machine, and one target site serving
100 Data Sources applies each event 100 times into the same tables, one write lock
after another: either way the figure would be the targets' apply rate, not what the
source's delivery costs. Applying is measured by bench/lag.py.

Figures per mode, over ``--events`` events (after ``WARMUP`` not counted): p50,
p99 and max of the time from commit until *all* targets had the event; the p50
of the time until the first and the median target had it; the writer's time
(``create()`` of the row, commit and after-commit work included); the threads
named ``changefeed-push*`` the mode started in this process. Every event must
reach every target: a missing one stops the run ("benchmark self-check failed").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import Site  # noqa: E402

SECRET = "bench-fanout-secret-0123456789abcdef0123456789abcdef"
WARMUP = 2
#: The inline backend before the delivery pool (the last commit that changed it).
BEFORE_REV = "ea990e9"
BEFORE_MODULE = "changefeed_sync.source.delivery._inline_before_pool"

#: A receiver: prints "<port>" once listening, then "<monotonic> <target> <keys>" per
#: verified delivery (keys: the natural keys of its events, comma-separated).
RECEIVER = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import django
from django.conf import settings
settings.configure(USE_TZ=True, INSTALLED_APPS=[])
django.setup()
from changefeed_sync.signing import verify_request
from changefeed_sync.exceptions import SignatureError

SECRET = sys.argv[1]
LATENCY = float(sys.argv[2])
out = sys.stdout

class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: with Nagle's algorithm the body waited for
    # the client's delayed ACK, 40 ms per request on Linux.
    disable_nagle_algorithm = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = self.path.strip("/").split("/")
        status, answer = 200, {"status": "applied"}
        try:
            if len(parts) != 2 or parts[0] != "hook":
                raise SignatureError("no such hook")
            name, _ = verify_request(
                self.headers.get("X-Changefeed-Signature"), "POST", self.path, body,
                lambda n: [SECRET] if n == parts[1] else None, max_age=60,
            )
            batch = json.loads(body)
            since, last = int(batch["since"]), int(batch["last_seq"])
            events = batch["events"]
            if not (since < last and events and events[-1]["seq"] == last):
                raise ValueError(f"bad framing {since} {last}")
            keys = ",".join(str(e["key"][0]) for e in events)
            out.write(f"{time.monotonic()!r} {name} {keys}\n")
            out.flush()
            if LATENCY:
                time.sleep(LATENCY)  # a target further away, or slower to apply
        except (SignatureError, ValueError, KeyError) as exc:
            status, answer = 403, {"error": str(exc)}
            sys.stderr.write(f"refused {self.path}: {exc}\n")
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
server.daemon_threads = True
out.write(f"{server.server_address[1]}\n")
out.flush()
server.serve_forever()
"""


class BenchError(RuntimeError):
    pass


@dataclass
class Result:
    mode: str
    targets: int
    events: int
    all_p50_ms: float
    all_p99_ms: float
    all_max_ms: float
    first_p50_ms: float
    median_target_p50_ms: float
    writer_p50_ms: float
    writer_max_ms: float
    push_threads: int


class Receivers:
    """The receiver processes and a thread per process collecting their stamps."""

    def __init__(self, count: int, latency: float = 0.0) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.urls: list[str] = []
        self._lock = threading.Lock()
        #: (target name, event key) -> first arrival
        self.arrivals: dict[tuple[str, str], float] = {}
        self._changed = threading.Condition(self._lock)
        for _ in range(count):
            process = subprocess.Popen(
                [sys.executable, "-c", RECEIVER, SECRET, str(latency)], cwd=ROOT,
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            )
            self.processes.append(process)
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            if not line.isdigit():
                raise BenchError(f"a receiver did not start (said {line!r})")
            self.urls.append(f"http://127.0.0.1:{line}/")
            threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            stamp, name, keys = line.split()
            with self._changed:
                for key in keys.split(","):
                    self.arrivals.setdefault((name, key), float(stamp))
                self._changed.notify_all()

    def webhook_url(self, index: int, name: str) -> str:
        return f"{self.urls[index % len(self.urls)]}hook/{name}/"

    def wait_for(self, names: list[str], key: str, timeout: float) -> dict[str, float]:
        """The first arrival, per target, of the event of ``key``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = {n: self.arrivals[n, key] for n in names if (n, key) in self.arrivals}
                if len(found) == len(names):
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(names) - set(found))
                    raise BenchError(
                        f"benchmark self-check failed: event {key} never reached "
                        f"{len(missing)} of {len(names)} targets (first missing: {missing[0]})"
                    )
                self._changed.wait(min(remaining, 0.5))

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(5)


def setup_django(source: Site) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.e2e_settings"
    os.environ["CFS_DATABASE_URL"] = source.database_url
    import django

    django.setup()


def load_before(rev: str) -> str:
    """The inline backend of ``rev`` as a module of its own; its dotted path."""
    source = subprocess.run(
        ["git", "show", f"{rev}:changefeed_sync/delivery/inline.py"], cwd=ROOT,
        capture_output=True, text=True, check=True,
    ).stdout
    # Written when the backends were changefeed_sync.delivery: the core is a level up now.
    for core in ("models", "conf"):
        source = source.replace(f"from ..{core} import", f"from ...{core} import")
    source = source.replace("from .. import conf, push", "from ... import conf\nfrom .. import push")
    module = types.ModuleType(BEFORE_MODULE)
    module.__package__ = "changefeed_sync.source.delivery"
    module.__file__ = f"<git show {rev}:changefeed_sync/delivery/inline.py>"
    sys.modules[BEFORE_MODULE] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return f"{BEFORE_MODULE}.InlineBackend"


def push_threads() -> set[int]:
    return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("changefeed-push")}


def write_one(slug: str) -> tuple[float, float]:
    """Commit one Tag; return (the commit stamp, the writer's seconds)."""
    from django.db import transaction

    from tests.testapp.models import Tag

    committed: list[float] = []
    started = time.monotonic()
    with transaction.atomic():
        transaction.on_commit(lambda: committed.append(time.monotonic()))
        Tag.objects.create(slug=slug)
    return committed[0], time.monotonic() - started


def recorded(timeout: float) -> None:
    """Wait until every Target row records the newest event as delivered (or enqueued)."""
    from changefeed_sync.models import Target
    from changefeed_sync.source import feed

    head = feed.head("default")
    deadline = time.monotonic() + timeout
    while Target.objects.filter(delivered_seq__lt=head).exists():
        if time.monotonic() > deadline:
            raise BenchError("benchmark self-check failed: deliveries were never recorded")
        time.sleep(0.01)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    if len(ordered) < 2:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[98]


@dataclass
class Samples:
    all_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    median_ms: list[float] = field(default_factory=list)
    writer_ms: list[float] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def result(self, mode: str, targets: int) -> Result:
        return Result(
            mode=mode, targets=targets, events=len(self.all_ms),
            all_p50_ms=statistics.median(self.all_ms), all_p99_ms=p99(self.all_ms),
            all_max_ms=max(self.all_ms), first_p50_ms=statistics.median(self.first_ms),
            median_target_p50_ms=statistics.median(self.median_ms),
            writer_p50_ms=statistics.median(self.writer_ms), writer_max_ms=max(self.writer_ms),
            push_threads=len(self.threads),
        )


def one_event(mode: str, index: int, names: list[str], receivers: Receivers, timeout: float,
              samples: Samples, *, counted: bool) -> None:
    threads_before = push_threads()
    slug = f"{mode}-{index:04d}"
    committed, took = write_one(slug)
    arrived = receivers.wait_for(names, slug, timeout)
    recorded(timeout)  # the round's last writes end before the next mode's write
    samples.threads |= push_threads() - threads_before
    if not counted:
        return
    lags = sorted((stamp - committed) * 1000 for stamp in arrived.values())
    samples.all_ms.append(lags[-1])
    samples.first_ms.append(lags[0])
    samples.median_ms.append(statistics.median(lags))
    samples.writer_ms.append(took * 1000)


HEADER = (
    f"{'mode':<11} {'targets':>7} {'events':>6} {'all p50':>8} {'all p99':>8} {'all max':>8} "
    f"{'first p50':>9} {'median p50':>10} {'writer p50':>10} {'writer max':>10} {'threads':>7}"
)


def print_row(r: Result) -> None:
    print(
        f"{r.mode:<11} {r.targets:>7} {r.events:>6} {r.all_p50_ms:>8.1f} {r.all_p99_ms:>8.1f} "
        f"{r.all_max_ms:>8.1f} {r.first_p50_ms:>9.1f} {r.median_target_p50_ms:>10.1f} "
        f"{r.writer_p50_ms:>10.1f} {r.writer_max_ms:>10.1f} {r.push_threads:>7}",
        flush=True,
    )


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    from tests.emulator import Emulator, EmulatorUnavailable

    modes: list[str] = args.modes.split(",")
    source = Site("src", args.backend, workdir)
    receivers: Receivers | None = None
    emulator: Emulator | None = None
    results: list[Result] = []
    try:
        source.create_database()
        source.migrate()
        setup_django(source)
        from django.test import override_settings
        from django.utils.module_loading import import_string

        from changefeed_sync.models import Target
        from changefeed_sync.source import push

        receivers = Receivers(args.receivers, args.target_latency / 1000)
        names = [f"t{i:03d}" for i in range(args.targets)]
        Target.objects.bulk_create(
            Target(name=name, secrets=SECRET, webhook_url=receivers.webhook_url(i, name))
            for i, name in enumerate(names)
        )
        # One backend instance per mode for the whole run, as a process has one; the
        # modes take turns event by event, so load drifting during the run favours none.
        chosen: dict[str, tuple[dict[str, Any], Any]] = {}
        for mode in modes:
            settings: dict[str, Any]
            if mode == "before":
                settings = {"CHANGEFEED_SYNC_DELIVERY_BACKEND": load_before(args.before_rev)}
            elif mode == "inline":
                settings = {
                    "CHANGEFEED_SYNC_DELIVERY_BACKEND":
                        "changefeed_sync.source.delivery.inline.InlineBackend",
                }
                if args.workers:
                    settings["CHANGEFEED_SYNC_DELIVERY_WORKERS"] = args.workers
            elif mode == "cloudtasks":
                emulator = Emulator(workdir / "emulator.log")
                try:
                    emulator.start()
                except EmulatorUnavailable as exc:
                    raise BenchError(f"gcloud-tasks-emulator unavailable: {exc}") from exc
                emulator.create_queue("fanout")
                settings = emulator.settings("fanout")
            else:
                raise BenchError(f"unknown mode {mode!r}")
            path = settings["CHANGEFEED_SYNC_DELIVERY_BACKEND"]
            chosen[mode] = (settings, import_string(path)())
        samples = {mode: Samples() for mode in modes}
        for i in range(WARMUP + args.events):
            for mode in modes:
                settings, instance = chosen[mode]
                with override_settings(**settings):
                    push._backend = instance  # this mode's one instance, not a new one
                    push._backend_path = settings["CHANGEFEED_SYNC_DELIVERY_BACKEND"]
                    one_event(mode, i, names, receivers, args.timeout, samples[mode],
                              counted=i >= WARMUP)
        for mode in modes:
            results.append(samples[mode].result(mode, len(names)))
            print_row(results[-1])
    finally:
        if emulator is not None:
            emulator.stop()
        if receivers is not None:
            receivers.stop()
        source.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 targets, 5 events per mode")
    parser.add_argument("--targets", type=int, help="Targets (default 100)")
    parser.add_argument("--events", type=int, help="events per mode (default 20)")
    parser.add_argument("--receivers", type=int, default=2, help="receiver processes")
    parser.add_argument(
        "--target-latency", type=float, default=0.0, metavar="MS",
        help="milliseconds each receiver waits before answering (a distant or slow target; "
        "the arrival is stamped before the wait)",
    )
    parser.add_argument(
        "--modes", default="before,inline,cloudtasks",
        help="comma-separated: before, inline, cloudtasks (default: all three)",
    )
    parser.add_argument("--workers", type=int,
                        help="CHANGEFEED_SYNC_DELIVERY_WORKERS of the inline mode (default: its own)")
    parser.add_argument("--before-rev", default=BEFORE_REV,
                        help=f"git revision of the previous inline backend (default {BEFORE_REV})")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite",
                        help="the source's database (default: sqlite)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds an event may take to reach every target")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.targets = args.targets or (20 if args.quick else 100)
    args.events = args.events or (5 if args.quick else 20)
    print(
        f"fan-out: one event to {args.targets} targets ({args.receivers} receiver processes "
        f"on loopback, answering after {args.target_latency:g} ms), {args.events} events per mode after {WARMUP} not counted; source on "
        f"{args.backend}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    print("milliseconds from commit until all / the first / the median target had the event")
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="changefeed_sync-fanout-") as tmp:
        try:
            results = run(args, Path(tmp))
        except BenchError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    by_mode = {r.mode: r for r in results}
    base = by_mode.get("before")
    for r in results:
        if base is not None and r is not base:
            print(f"{r.mode}: all-targets p50 {base.all_p50_ms / r.all_p50_ms:.2f}x faster than "
                  f"before ({base.all_p50_ms:.1f} -> {r.all_p50_ms:.1f} ms), "
                  f"threads {base.push_threads} -> {r.push_threads}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other work on the machine "
          "inflates the figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
