"""The feed of filtered Targets (issue 14): 10 Targets with disjoint row filters against
1 unfiltered Target reading the same events, side by side in one run.

    .venv-django6/bin/python bench/filtered_feed.py                   # every database that answers
    .venv-django6/bin/python bench/filtered_feed.py --only sqlite     # or postgresql, mysql
    .venv-django6/bin/python bench/filtered_feed.py --events 5000 --rounds 1   # shorter

Per database: 10 countries with 5 languages each; the Targets ``only-c0`` ... ``only-c9``
each receive one country's copies (``language__country__code__in``, through two parents)
and ``all`` receives every copy. ``--events`` (20,000) copies are then created and
updated through the ORM, spread over the countries, so capture routes each event to
the ten (one of them gets it, the nine others nothing). Then each Target reads the
whole feed from the start, in pages of ``--page`` (1,000) events, with
``source/feed.read`` as the view calls it (no HTTP): events/s it was served (the events
it received over the time it read), the feed's span read per second, and p50/p99 of a
page. Each filtered Target must receive exactly its country's events, and the ten
together every event ``all`` receives, or the run prints INVALID and exits 1.

Rounds alternate (``all`` first, then last) and figures are medians over rounds (and,
for the ten, over Targets). Databases as bench/writers.py (created fresh, dropped at exit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import pg  # noqa: E402
from bench import writers as w  # noqa: E402

w.DB_NAME = w.DB_NAME.replace("bench_writers_", "bench_filtered_feed_")
COUNTRIES = [f"c{i}" for i in range(10)]


def seed(alias: str, events: int) -> dict[str, int]:
    """The countries, languages and copies (capture routes their events); the number of
    copy events each country's Target must receive."""
    from django.db import transaction

    from changefeed_sync.models import Target
    from tests.testapp.models import Copy, Country, Language

    for code in COUNTRIES:
        Target.objects.using(alias).create(
            name=f"only-{code}", secrets="bench-secret-not-real",
            row_filters={"testapp.copy": {"language__country__code__in": [code]}},
        )  # fmt: skip
    Target.objects.using(alias).create(name="all", secrets="bench-secret-not-real")
    languages = []
    for code in COUNTRIES:
        country = Country.objects.using(alias).create(code=code, name=code)
        languages += [
            Language.objects.using(alias).create(country=country, code=f"l{k}") for k in range(5)
        ]
    per_country = dict.fromkeys(COUNTRIES, 0)
    creates = events // 2
    for start in range(0, creates, 100):
        with transaction.atomic(using=alias):
            for n in range(start, min(start + 100, creates)):
                language = languages[n % len(languages)]
                Copy.objects.using(alias).create(language=language, key=f"k{n}", value="v")
                per_country[COUNTRIES[(n % len(languages)) // 5]] += 1
    copies = list(Copy.objects.using(alias).select_related("language__country").order_by("pk"))
    for start in range(0, events - creates, 100):
        with transaction.atomic(using=alias):
            for copy in copies[start : start + 100]:
                copy.value = "updated"
                copy.save(using=alias)
                per_country[copy.language.country.code] += 1
    return per_country


def read_all(alias: str, name: str, page: int) -> tuple[float, list[float], int, int]:
    """(seconds, page times, copy events received, position reached) of one Target
    reading the whole feed from the start."""
    from changefeed_sync.models import Target
    from changefeed_sync.selection import Selection
    from changefeed_sync.source import feed, routes

    target = Target.objects.using(alias).get(name=name)
    routed = routes.reading(target)
    assert not isinstance(routed, str), routed
    models = Selection.of(target).model_list()
    since, received, times = 0, 0, []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        got = feed.read(since, page, using=alias, models=models, routed=routed)
        times.append(time.perf_counter() - t)
        received += sum(1 for e in got.events if e["model"] == "testapp.copy")
        since = got.last_seq
        if not got.more:
            break
    return time.perf_counter() - start, times, received, since


def bench(vendor: str, args: argparse.Namespace) -> tuple[list[list[str]], bool]:
    from changefeed_sync.source import feed

    alias = w.ALIAS[vendor]
    expected = seed(alias, args.events)
    head = feed.head(alias)
    print(f"[{w.NAME[vendor]}] {args.events:,} copy events, feed head {head:,}", flush=True)
    rates: dict[str, list[float]] = {"all": [], "filtered": []}
    spans: dict[str, list[float]] = {"all": [], "filtered": []}
    pages: dict[str, list[float]] = {"all": [], "filtered": []}
    valid = True
    for rnd in range(args.rounds):
        names = ["all", *(f"only-{c}" for c in COUNTRIES)]
        for name in names if rnd % 2 == 0 else reversed(names):
            seconds, times, received, reached = read_all(alias, name, args.page)
            kind = "all" if name == "all" else "filtered"
            want = sum(expected.values()) if name == "all" else expected[name[5:]]
            if received != want:
                print(f"  INVALID: {name} received {received} copy events, expected {want}")
                valid = False
            rates[kind].append(received / seconds)
            spans[kind].append(reached / seconds)
            pages[kind] += times
        print(f"  round {rnd + 1} done", flush=True)

    def q(values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100)[int(p) - 1] if len(values) > 1 else values[0]

    rows = []
    for kind, label in (
        ("all", "unfiltered (`all`)"),
        ("filtered", "10 filtered, one country each"),
    ):
        rows.append(
            [
                w.NAME[vendor], label,
                f"{statistics.median(rates[kind]):,.0f}",
                f"{statistics.median(spans[kind]):,.0f}",
                f"{statistics.median(pages[kind]) * 1000:.1f} ms",
                f"{q(pages[kind], 99) * 1000:.1f} ms",
            ]
        )  # fmt: skip
    return rows, valid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="copy events (20,000)")
    parser.add_argument("--page", type=int, default=1000, help="events per feed page (1,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--only", action="append", choices=w.VENDORS, help="this database only")
    args = parser.parse_args(argv)
    vendors = [v for v in w.VENDORS if args.only is None or v in args.only]
    if "postgresql" in vendors and pg.unavailable():
        vendors.remove("postgresql")
    if "mysql" in vendors and w.mariadb_unavailable():
        vendors.remove("mysql")
    print(f"filtered feed bench: {w.code_under_test()}; load average {w.load()}", flush=True)
    directory = tempfile.mkdtemp()
    w.create_databases(vendors)
    try:
        w.configure(vendors, directory)
        table: list[list[str]] = []
        ok = True
        for vendor in vendors:
            rows, valid = bench(vendor, args)
            table += rows
            ok &= valid
    finally:
        w.drop_databases(vendors)
    print(f"\nload average at the end {w.load()}\n")
    print(
        "| database | reader | events/s it received | feed positions/s read | page p50 | page p99 |"
    )
    print("|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
