"""A write from a process that exits right after it (a management command, a cron job,
``manage.py shell -c``) reaches its targets without any later write.

The writer is a real short-lived process: ``python -m django shell -c "..."`` on a
source site of tests/servers.py (SQLite, PostgreSQL, MariaDB), with the settings a
project would have (tests/push_settings.py). Its inline deliveries run on the pool's
daemon threads; at exit the process waits for them (``CHANGEFEED_SYNC_DELIVERY_EXIT_WAIT``)
and records them. The target is a real target site (``runserver`` on SQLite, applying
the webhook), or, where a target must hang, the receiver of tests/receivers.py.
Cloud Tasks: tests/test_cloud_tasks.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dbs import require_alias
from tests.receivers import running
from tests.servers import ALIAS_OF, REPO_ROOT, Site, wait_until

pytestmark = pytest.mark.timeout(240)

SECRET = "exit-test-secret-0123456789abcdef0123456789abcdef"

WRITE = """
import time
from tests.testapp.models import Country
Country.objects.create(code={code!r}, name="written by a process that exits")
print("WROTE", repr(time.monotonic()), flush=True)
"""


@pytest.fixture(scope="module")
def target_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site("tgt", "sqlite", tmp_path_factory.mktemp("exit-target"))
    try:
        site.start_shell()
        site.create_database()
        site.migrate()
        site.start_server()
        yield site
    finally:
        site.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres", "mariadb"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Site]:
    """A source site (no server: nothing but the writing process delivers)."""
    require_alias(ALIAS_OF[request.param])
    site = Site("src", request.param, tmp_path_factory.mktemp(f"exit-source-{request.param}"))
    try:
        site.start_shell()
        site.create_database()
        site.migrate()
        yield site
    finally:
        site.close()


def set_target(source: Site, webhook_url: str) -> None:
    """The source's only Target, ``tgt``, fresh: nothing delivered yet."""
    source.run_python(f"""
        from changefeed_sync.models import Target
        Target.objects.all().delete()
        Target.objects.create(name="tgt", secrets={SECRET!r}, webhook_url={webhook_url!r})
    """)


def reset_target_site(site: Site) -> None:
    site.run_python(f"""
        from changefeed_sync.models import DataSource, Nonce
        from tests.testapp.models import Country
        Country.objects.all().delete()
        Nonce.objects.all().delete()
        DataSource.objects.all().delete()
        # Nothing to pull from: every event must come in the pushed batch.
        DataSource.objects.create(name="src", url="http://127.0.0.1:9/sync/",
                                  client_name="tgt", secrets={SECRET!r})
    """)


def head(source: Site) -> int:
    return int(source.run_python("from changefeed_sync.source import feed; print(feed.head('default'))"))


def target_row(source: Site) -> dict[str, Any]:
    return dict(source.run_python("""
        from changefeed_sync.models import Target
        t = Target.objects.get(name="tgt")
        print(json.dumps({"delivered_seq": t.delivered_seq, "failures": t.failures}))
    """))


def run_django(source: Site, *args: str, settings: dict[str, Any]) -> tuple[str, str, float]:
    """``manage.py ARGS`` as its own process with ``settings`` added; (stdout, stderr,
    monotonic time it was seen to exit)."""
    env = source.env()
    env.update(DJANGO_SETTINGS_MODULE="tests.push_settings",
               CFS_EXTRA_SETTINGS=json.dumps(settings))
    result = subprocess.run(
        [sys.executable, "-m", "django", *args], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    exited = time.monotonic()
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, result.stderr, exited


def write_and_exit(source: Site, code: str, settings: dict[str, Any]) -> tuple[float, str]:
    """Write one Country from ``shell -c`` and exit; (seconds from the write's commit to
    the process's exit, its stderr)."""
    stdout, stderr, exited = run_django(
        source, "shell", "-c", WRITE.format(code=code), settings=settings
    )
    wrote = float(stdout.split("WROTE", 1)[1].split()[0])
    return exited - wrote, stderr


def test_a_process_that_exits_right_after_a_write_delivers_it_first(
    source: Site, target_site: Site
) -> None:
    reset_target_site(target_site)
    set_target(source, f"{target_site.url}sync/webhook/src/")
    took, stderr = write_and_exit(source, "ex", {})
    last = head(source)

    # Delivered before the process ended: no process of the source runs any more.
    wait_until(lambda: target_site.scalar(
        "SELECT checkpoint FROM changefeed_sync_datasource WHERE name = 'src'") == last,
        timeout=5, what="the target's checkpoint to reach the write")
    assert target_site.scalar("SELECT name FROM testapp_country WHERE code = 'ex'") == (
        "written by a process that exits"
    )
    # ... and recorded: the next process does not send it again.
    assert target_row(source) == {"delivered_seq": last, "failures": 0}
    assert took < 5.0, took  # it waited for its delivery, not for the exit wait's end
    assert "unfinished" not in stderr, stderr


def test_the_exit_wait_is_bounded_and_the_sweeper_sends_what_was_left(
    source: Site, tmp_path: Path
) -> None:
    with running(SECRET) as receiver:
        receiver.released.clear()  # the target hangs: no answer until released
        set_target(source, receiver.webhook_url("tgt"))
        took, stderr = write_and_exit(
            source, "hg", {"CHANGEFEED_SYNC_DELIVERY_EXIT_WAIT": 1.0}
        )
        last = head(source)
        assert 1.0 <= took < 4.0, took  # gave up after about a second
        assert "exiting with deliveries to 1 target(s) unfinished" in stderr, stderr
        assert receiver.attempts.get("tgt") == 1  # it was in flight
        assert target_row(source)["delivered_seq"] < last  # never acknowledged

        receiver.released.set()
        stdout, _, _ = run_django(source, "changefeed_push", settings={})
        assert "target tgt: delivered up to" in stdout, stdout
        receiver.wait_for_seq(["tgt"], last, timeout=10)
        assert receiver.spans("tgt")[-1][1] == last
        assert receiver.refused == []
    assert target_row(source) == {"delivered_seq": last, "failures": 0}
