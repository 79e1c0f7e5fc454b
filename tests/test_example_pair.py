"""The demo's one command, example_pair/run, run for real: two sites, a pull, edits, Ctrl-C.

The command runs as a user would start it (a subprocess of bash, its own servers on
127.0.0.1), with this test run's Python instead of a virtualenv of its own
(EXAMPLE_PAIR_PYTHON) and its databases, media and logs in a temporary directory
(EXAMPLE_PAIR_VAR). Every process it starts inherits that directory in its environment,
which is how the tests find any process left running.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
import requests

from tests import dbs
from tests.dbs import require_alias
from tests.servers import REPO_ROOT, Background, Site, wait_until

pytestmark = pytest.mark.timeout(120)

RUN = str(REPO_ROOT / "example_pair" / "run")


def require_pillow() -> None:
    """The demo's Copy has an ImageField, which needs Pillow (in the 'test' dependency group)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        message = "Pillow is not installed (the demo's ImageField needs it)"
        if dbs.in_ci():
            pytest.fail(message + "; it must be, under CI=true")
        pytest.skip(message)


def demo_env(var: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith(("EXAMPLE_PAIR_", "DJANGO_")) or name.endswith("DATABASE_URL"):
            del env[name]
    env.update(
        EXAMPLE_PAIR_PYTHON=sys.executable,
        EXAMPLE_PAIR_VAR=str(var),
        EXAMPLE_PAIR_SOURCE_PORT="0",
        EXAMPLE_PAIR_TARGET_PORT="0",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def processes_of(var: Path) -> list[str]:
    """Processes whose environment names this run's EXAMPLE_PAIR_VAR: the demo's."""
    marker = f"EXAMPLE_PAIR_VAR={var}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone, or not ours to read
    return found


def admin_urls(output: str) -> tuple[str, str]:
    source = re.search(r"source admin\s+(http://127\.0\.0\.1:\d+/admin/)", output)
    target = re.search(r"target admin\s+(http://127\.0\.0\.1:\d+/admin/)", output)
    assert source and target, output
    return source.group(1), target.group(1)


def arrived(output: str) -> set[int]:
    """Numbers of the edits the command reported arriving on the target."""
    return {int(n) for n in re.findall(r"target  edit +(\d+) ", output)}


def demo_rows(path: Path) -> dict[str, set[tuple[str, ...]]]:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return {
            "country": set(conn.execute("SELECT code, name FROM demo_country")),
            "language": set(
                conn.execute(
                    "SELECT c.code, l.code, l.name FROM demo_language l "
                    "JOIN demo_country c ON c.id = l.country_id"
                )
            ),
            "copy": set(
                conn.execute(
                    "SELECT c.code, l.code, k.key, k.value FROM demo_copy k "
                    "JOIN demo_language l ON l.id = k.language_id "
                    "JOIN demo_country c ON c.id = l.country_id"
                )
            ),
        }
    finally:
        conn.close()


def test_run_ctrl_c_then_run_again(tmp_path: Path) -> None:
    """The default run (SQLite, follower and push together), stopped with Ctrl-C; then a
    second run on the same databases."""
    require_pillow()
    var = tmp_path / "var"
    run = Background([RUN], demo_env(var, EXAMPLE_PAIR_INTERVAL="0.1"), tmp_path, "run")
    try:
        banner = run.wait_for_output("example_pair is running", stream="stdout", timeout=60)
        assert "full Data Pull" in banner and "succeeded" in banner, run.output()
        assert re.search(r"demo\.copy: 30 created, 0 updated, 0 deleted", banner), run.output()
        assert re.search(r"login\s+admin / \S+", banner), run.output()
        source_admin, target_admin = admin_urls(banner)
        # Edits of every kind (save, create, delete, QuerySet.update), twice, seen arriving.
        wanted = set(range(1, 11))
        wait_until(
            lambda: wanted <= arrived(run.stdout()) or run.poll() is not None,
            timeout=30,
            what="ten edits arriving on the target",
        )
        assert wanted <= arrived(run.stdout()), run.output()
        for url, header in ((source_admin, "Source site"), (target_admin, "Target site")):
            response = requests.get(url + "login/", timeout=10)
            assert response.status_code == 200 and header in response.text
        assert len(processes_of(var)) >= 6, processes_of(var)  # run, 2 servers, follower, ...

        run.signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert run.wait(timeout=30) == 0, run.output()
    finally:
        run.stop()
    output = run.stdout()
    assert "stopped; nothing left running" in output, run.output()
    assert processes_of(var) == []
    # No process of the demo hit an error on the way (a failed webhook would be retried
    # and a failed page applied again, so the edits alone would not show it).
    for log in sorted((var / "logs").glob("*.log")):
        assert "Traceback" not in log.read_text(errors="replace"), f"{log.name}:\n{log.read_text()}"
    for url in (source_admin, target_admin):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=5)
    # Whatever the last edit was, the target ended up with the source's rows.
    assert demo_rows(var / "target.sqlite3") == demo_rows(var / "source.sqlite3")

    # Run again on the same databases, following only, a bounded number of edits: the
    # setup puts the demo content back and the pull only updates what the edits changed.
    again = Background(
        [RUN, "--mode", "follow", "--edits", "5"],
        demo_env(var, EXAMPLE_PAIR_INTERVAL="0.1"),
        tmp_path,
        "again",
    )
    try:
        assert again.wait(timeout=60) == 0, again.output()
    finally:
        again.stop()
    output = again.stdout()
    assert re.search(r"demo\.copy: 0 created, [1-9]\d* updated", output), again.output()
    assert "the source pushes" not in output and "--follow (long-poll)" in output
    assert "All 5 edits arrived on the target." in output, again.output()
    assert processes_of(var) == []
    assert demo_rows(var / "target.sqlite3") == demo_rows(var / "source.sqlite3")


def test_bounded_run_on_postgres_and_mariadb(tmp_path: Path) -> None:
    """SOURCE_DATABASE_URL / TARGET_DATABASE_URL, pushes only; --edits N exits with 0."""
    require_pillow()
    require_alias("postgres")
    require_alias("mariadb")
    var = tmp_path / "var"
    # Database names of their own (cfs_e2e_<pid>_example_*): test_e2e's sites use theirs.
    source = Site("example_source", "postgres", tmp_path)
    target = Site("example_target", "mariadb", tmp_path)
    for site in (source, target):
        site.drop_database()  # the command creates the databases it is given
    try:
        run = Background(
            [RUN, "--mode", "push", "--edits", "5", "--interval", "0.2"],
            demo_env(
                var,
                SOURCE_DATABASE_URL=source.database_url,
                TARGET_DATABASE_URL=target.database_url,
            ),
            tmp_path,
            "run",
        )
        try:
            status = run.wait(timeout=90)
        finally:
            run.stop()
        assert status == 0, run.output()
        output = run.stdout()
        assert "All 5 edits arrived on the target." in output, run.output()
        assert arrived(output) == {1, 2, 3, 4, 5}
        assert "stopped; nothing left running" in output
        assert "the source pushes" in output and "--follow" not in output
        assert processes_of(var) == []
        assert not (var / "source.sqlite3").exists()
        copies = "SELECT COUNT(*) FROM demo_copy"
        assert source.scalar(copies) == target.scalar(copies) == 31  # edit 3 added one
        country = "SELECT name FROM demo_country WHERE code = 'de'"
        assert source.scalar(country) == target.scalar(country) == "Deutschland (edit 2)"
    finally:
        for site in (source, target):
            site.close()
