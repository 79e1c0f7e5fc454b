"""The collector is paused while a pull builds its pages only in a process that does
nothing else (``manage.py changefeed_pull``): never in the web process, where an
admin-started pull runs beside the requests, nor where ``call_command`` runs it (issue 13: no process-wide side effect
that nobody asked for)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from changefeed_sync import rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def pauses_as_they_were() -> Iterator[None]:
    was = rows._pauses_allowed
    try:
        yield
    finally:
        rows._pauses_allowed = was


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


def test_without_leave_the_collector_runs(collector_on: None) -> None:
    rows._pauses_allowed = False  # as in any process that did not allow them
    with rows.collection_paused():
        assert gc.isenabled()
    assert gc.isenabled()


def test_the_pull_command_pauses_it_and_gives_it_back() -> None:
    """In a process of its own, as the command runs: paused inside, nested pauses
    counted, enabled again after the last one."""
    script = textwrap.dedent(
        """
        import gc, os
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        os.environ["CFS_DB_PROBE"] = "0"
        import django
        django.setup()
        from changefeed_sync import rows
        from changefeed_sync.management.commands.changefeed_pull import Command
        with rows.collection_paused():
            assert gc.isenabled(), "paused before the command allowed it"
        from django.core.management import call_command
        try:  # from a process that does more than the pull: no pauses
            call_command("changefeed_pull", "no-such-source")
        except Exception:
            pass  # no database is set up here
        with rows.collection_paused():
            assert gc.isenabled(), "call_command allowed the pauses"
        try:  # as manage.py runs it: its first step allows them
            Command().run_from_argv(["manage.py", "changefeed_pull", "no-such-source"])
        except BaseException:
            pass  # no database here: the command exits
        with rows.collection_paused():
            with rows.collection_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
