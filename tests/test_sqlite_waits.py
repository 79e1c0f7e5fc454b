"""Prompt waits for SQLite's lock: a whole transaction retried every millisecond
while another connection holds the database, a feed request served meanwhile."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from django.db import OperationalError, connection, transaction

from changefeed_sync.models import Target
from changefeed_sync.source.sqlite_waits import prompt_lock_waits, retry_transaction

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.fixture
def sqlite() -> None:
    if connection.vendor != "sqlite":
        pytest.skip("SQLite only")
    connection.ensure_connection()


def _busy_timeout() -> int:
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        return int(cursor.fetchone()[0])


class _Holder:
    """Another connection that locks everyone out, then commits after ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.db = sqlite3.connect(
            connection.settings_dict["NAME"], isolation_level=None, check_same_thread=False
        )
        self.db.execute("BEGIN EXCLUSIVE")
        self.timer = threading.Timer(seconds, lambda: self.db.execute("COMMIT"))
        self.timer.start()

    def close(self) -> None:
        self.timer.join()
        self.db.close()


def test_a_locked_transaction_is_run_again_until_it_gets_in(sqlite: None) -> None:
    normal = _busy_timeout()
    attempts: list[float] = []

    def work() -> None:
        attempts.append(time.monotonic())
        with transaction.atomic():
            Target.objects.create(name="t", secrets="s")

    holder = _Holder(0.3)
    try:
        started = time.monotonic()
        retry_transaction("default", work)
        waited = time.monotonic() - started
    finally:
        holder.close()
    assert waited >= 0.25
    assert len(attempts) > 10  # tried about every millisecond, not in long sleeps
    assert Target.objects.filter(name="t").count() == 1  # written once
    assert _busy_timeout() == normal


def test_other_errors_and_the_timeout_go_through(sqlite: None, settings: object) -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise OperationalError("no such table: nowhere")

    with pytest.raises(OperationalError, match="no such table"):
        retry_transaction("default", broken)
    assert calls == [1]

    # A lock held longer than the connection's timeout: the error comes through.
    connection.settings_dict["OPTIONS"]["timeout"], saved = (
        0.2,
        connection.settings_dict["OPTIONS"].get("timeout"),
    )
    holder = _Holder(1.0)
    try:
        with pytest.raises(OperationalError, match="locked"):
            retry_transaction("default", lambda: Target.objects.create(name="u", secrets="s"))
    finally:
        holder.close()
        connection.settings_dict["OPTIONS"]["timeout"] = saved
    assert not Target.objects.filter(name="u").exists()


def test_inside_a_callers_transaction_work_just_runs(sqlite: None) -> None:
    with transaction.atomic():
        retry_transaction("default", lambda: Target.objects.create(name="v", secrets="s"))
        assert _busy_timeout() != 0
    assert Target.objects.filter(name="v").exists()


def test_prompt_waits_retry_statements_outside_transactions_only(sqlite: None) -> None:
    """In ``prompt_lock_waits`` a statement that finds the database locked is tried
    again every millisecond; in a transaction SQLite's own busy handler waits."""
    normal = _busy_timeout()
    holder = _Holder(0.3)  # readers are locked out until it commits
    try:
        started = time.monotonic()
        with prompt_lock_waits("default"):
            assert Target.objects.count() == 0  # waited, then read
            waited = time.monotonic() - started
            assert _busy_timeout() == 0
            with transaction.atomic():
                assert _busy_timeout() == normal
    finally:
        holder.close()
    assert waited >= 0.25
    assert _busy_timeout() == normal
