"""Soak of the convergence property (tests/test_convergence.py): many more examples than
CI runs, with a random seed, failures shrunk to a minimal sequence.

    .venv-django6/bin/python bench/soak.py                          # 200 examples per pair, all pairs
    .venv-django6/bin/python bench/soak.py --examples 1000 --steps 50
    .venv-django6/bin/python bench/soak.py --pairs sqlite-postgres mariadb-sqlite
    .venv-django6/bin/python bench/soak.py --seed 1234              # repeat a run
    .venv-django6/bin/python bench/soak.py --no-shrink              # report failures as found

It runs pytest on tests/test_convergence.py (the test suite's settings and database
servers, test databases suffixed ``soak`` so that other runs are not disturbed) with
``CFS_CONVERGENCE_*`` raising the number of examples, lifting the fixed seed and turning
shrinking on, and prints per pair and in total: examples run (shrinking included),
steps run (source operations that changed something), syncs and re-pulls, failures
found with the minimal falsifying sequence of each, and the wall time. Exit status 1
when a failure was found.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ("sqlite-postgres", "postgres-mariadb", "mariadb-sqlite")
TEST = "tests/test_convergence.py::test_target_converges_to_source"


def _failures(junit: Path) -> dict[str, list[str]]:
    """pair id -> the failures' texts (error line + falsifying sequence), from JUnit XML."""
    out: dict[str, list[str]] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        m = re.search(r"\[(.+)\]$", case.get("name", ""))
        pair = m.group(1) if m else case.get("name", "?")
        for failure in [*case.findall("failure"), *case.findall("error")]:
            out.setdefault(pair, []).extend(_cases(failure.text or failure.get("message", "")))
    return out


def _cases(text: str) -> list[str]:
    """Each falsifying sequence in a pytest failure text, with the error that ended it."""
    lines = [re.sub(r"^(E|\s*\|)\s?", "", line).rstrip() for line in text.splitlines()]
    cases, current, error = [], [], ""
    for line in lines:
        stripped = line.strip()
        if re.match(r"^[\w.]+(Error|Exception|Violation)\b.*:", stripped) and "Traceback" not in stripped:
            error = stripped
        if stripped.startswith("state = "):
            current = [stripped]
        elif current:
            if stripped.startswith(("state.", "source", "target:")) or line.startswith("  "):
                if stripped and not stripped.startswith(("Explanation", "/")):
                    current.append(stripped)
            if stripped == "state.teardown()" or stripped.startswith("Explanation"):
                cases.append(f"{error}\n      " + "\n      ".join(current))
                current = []
    if current:
        cases.append(f"{error}\n      " + "\n      ".join(current))
    if not cases and text.strip():
        cases.append(text.strip().splitlines()[-1])
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per pair (default 200)")
    parser.add_argument("--steps", type=int, default=40, help="most steps per example (default 40)")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS), metavar="PAIR",
                        help=f"source-target pairs (default all: {' '.join(PAIRS)})")  # fmt: skip
    parser.add_argument("--seed", type=int, help="Hypothesis seed (default: a random one, printed)")
    parser.add_argument("--no-shrink", action="store_true", help="do not shrink failures")
    parser.add_argument("--suffix", default="soak", help="CFS_TEST_DB_SUFFIX (default soak)")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="cfs-soak-") as tmp:
        stats, junit = Path(tmp) / "stats.jsonl", Path(tmp) / "junit.xml"
        env = {
            **os.environ,
            "CFS_CONVERGENCE_EXAMPLES": str(args.examples),
            "CFS_CONVERGENCE_STEPS": str(args.steps),
            "CFS_CONVERGENCE_RANDOM": "1",
            "CFS_CONVERGENCE_SHRINK": "0" if args.no_shrink else "1",
            "CFS_CONVERGENCE_STATS": str(stats),
            "CFS_TEST_DB_SUFFIX": args.suffix,
        }
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--hypothesis-seed={seed}", f"--junitxml={junit}", "-o", "timeout=0",
            *[f"{TEST}[{pair}]" for pair in args.pairs],
        ]  # fmt: skip
        print(f"soak: {args.examples} examples x <= {args.steps} steps per pair, "
              f"pairs {' '.join(args.pairs)}, seed {seed}", flush=True)  # fmt: skip
        started = time.monotonic()
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        rows = [json.loads(line) for line in stats.read_text().splitlines()] if stats.exists() else []
        failures = _failures(junit)

    if not rows:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        print("soak: the test did not run (see pytest's output above)")
        return 2
    keys = ("examples", "steps", "syncs", "pulls")
    print(f"\n{'pair':20} {'outcome':8} {'examples':>9} {'steps':>7} {'syncs':>6} "
          f"{'pulls':>6} {'failures':>8} {'seconds':>8}")  # fmt: skip
    total = dict.fromkeys(keys, 0)
    found = 0
    for row in rows:
        pair = row["pair"].replace("default", "sqlite").replace("->", "-")
        n = len(failures.get(pair, [])) if row["outcome"] == "failed" else 0
        found += n
        for k in keys:
            total[k] += row[k]
        print(f"{pair:20} {row['outcome']:8} {row['examples']:>9} {row['steps']:>7} "
              f"{row['syncs']:>6} {row['pulls']:>6} {n:>8} {row['seconds']:>8}")  # fmt: skip
    print(f"{'total':20} {'':8} {total['examples']:>9} {total['steps']:>7} {total['syncs']:>6} "
          f"{total['pulls']:>6} {found:>8} {wall:>8.1f}")  # fmt: skip
    for pair, texts in failures.items():
        for i, text in enumerate(texts, 1):
            print(f"\nfailure {i} on {pair}: {text}")
    print(f"\nsoak: {total['examples']} examples, {total['steps']} steps, {found} failures found, "
          f"wall time {wall:.0f} s (seed {seed})")  # fmt: skip
    return 1 if found or result.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
