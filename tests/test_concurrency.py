"""The feed is gap-free under concurrent writers (anchors: "The visibility gap").

An event id is taken when the outbox row is inserted, but becomes visible
only when its transaction commits. If transaction A takes id 101, B takes
102 and B commits first, a reader that moves its cursor to 102 never sees
101. ``outbox.lock`` serializes writers from their first captured write
until commit, so commit order equals id order. These tests use real
transactions on separate connections (one per thread):

* a deterministic interleaving per capture path: A holds the lock, B must
  wait (also a save in autocommit, which on PostgreSQL takes the lock inside
  its one statement), a reader in between sees nothing, afterwards it sees
  both, in order;
* a control that writes events without the lock and shows the same reader
  really does lose A's event, so the method above can detect a gap;
* a randomized stress run: overlapping writers and a reader following the
  feed with small pages must see every event exactly once, in id order;
* on MySQL/MariaDB, writers that find the lock row missing (after a flush)
  must neither deadlock nor wait on their own locks.

SQLite admits one writer at a time by itself, so it takes part in the
deterministic and the stress tests but cannot produce the control's gap.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import django
import pytest
from django.db import connections, transaction

from changefeed_sync import feed, outbox
from changefeed_sync.models import Event, OutboxState
from tests.testapp.models import Category, Country, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(120),
]

# Upper bound for any wait on another thread: a hang fails instead of blocking the run.
JOIN_TIMEOUT = 30.0
# How long a blocked writer must stay blocked to count as "serialized".
BLOCKED_FOR = 0.5


class Worker(threading.Thread):
    """A thread with its own database connections that re-raises its error on ``finish``."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # handed to the main thread by finish()
            self.error = exc
        finally:
            # Django connections are per thread: close this thread's, or the
            # test database cannot be flushed or dropped afterwards.
            connections.close_all()

    def finish(self, timeout: float = JOIN_TIMEOUT) -> None:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"thread {self.name} still running after {timeout} s")
        if self.error is not None:
            raise AssertionError(f"thread {self.name} failed: {self.error!r}") from self.error


def wait_for(event: threading.Event, worker: Worker, what: str) -> None:
    """Wait until ``worker`` sets ``event``; fail at once if it stopped without doing so."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not event.wait(0.05):
        if not worker.is_alive() or time.monotonic() > deadline:
            raise AssertionError(f"{worker.name} did not {what}: {worker.error!r}")


def finish_all(workers: list[Worker], timeout: float = JOIN_TIMEOUT) -> None:
    """Wait for every worker (none is left running into the table flush), then report failures."""
    deadline = time.monotonic() + timeout
    for w in workers:
        w.join(max(0.1, deadline - time.monotonic()))
    failures = []
    for w in workers:
        try:
            w.finish(0)
        except AssertionError as exc:
            failures.append(exc)
    if failures:
        raise AssertionError("; ".join(str(f) for f in failures)) from failures[0]


def last_id(alias: str) -> int:
    return Event.objects.using(alias).order_by("-id").values_list("id", flat=True).first() or 0


def ids_after(alias: str, cursor: int) -> list[int]:
    return list(
        Event.objects.using(alias).filter(id__gt=cursor).order_by("id").values_list("id", flat=True)
    )


def follow(alias: str, cursor: int, limit: int) -> list[dict[str, Any]]:
    """Read the feed from ``cursor`` to its end, page by page, as a target would."""
    seen: list[dict[str, Any]] = []
    for _ in range(10_000):
        page = feed.read(cursor, limit, using=alias)
        if not page.events:
            assert page.last_seq == cursor
            return seen
        assert page.last_seq == page.events[-1]["seq"]
        seen.extend(page.events)
        cursor = page.last_seq
    raise AssertionError("the feed did not end")


def ensure_lock_row(alias: str) -> None:
    """The row ``outbox.lock`` locks on MySQL/MariaDB; the migration creates it, a flush removes it."""
    OutboxState.objects.using(alias).get_or_create(id=1)


# ---------------------------------------------------------------- A holds the lock, B waits

# Each capture path, as the first writer (A, on countries) and as the one that
# must wait (B, on tags): every path has to take the outbox lock before its
# event gets an id, keep it until commit, and wait for it rather than fail.


def _a_save(alias: str) -> None:
    Country(code="aa", name="A").save(using=alias)


def _a_bulk_create(alias: str) -> None:
    Country.objects.using(alias).bulk_create([Country(code="aa"), Country(code="ab")])


def _a_update(alias: str) -> None:
    Country.objects.using(alias).filter(code="zz").update(name="A")


def _a_delete(alias: str) -> None:
    Country.objects.using(alias).filter(code="zz").delete()


def _b_save(alias: str, old: Tag) -> None:
    Tag(slug="b").save(using=alias)


def _b_bulk_create(alias: str, old: Tag) -> None:
    Tag.objects.using(alias).bulk_create([Tag(slug="b")])


def _b_update(alias: str, old: Tag) -> None:
    Tag.objects.using(alias).filter(slug="b0").update(slug="b")


def _b_bulk_update(alias: str, old: Tag) -> None:
    old.slug = "b"
    Tag.objects.using(alias).bulk_update([old], ["slug"])


def _b_autocommit_save(alias: str, old: Tag) -> None:
    # Outside any transaction: on PostgreSQL one statement that takes the lock itself.
    old.slug = "b"
    old.save(using=alias)


# (A's write, how many events it makes, B's write, B in a transaction)
INTERLEAVINGS: dict[str, tuple[Callable[[str], None], int, Callable[[str, Tag], None], bool]] = {
    "save-save": (_a_save, 1, _b_save, True),
    "bulk_create-bulk_create": (_a_bulk_create, 2, _b_bulk_create, True),
    "update-update": (_a_update, 1, _b_update, True),
    "delete-bulk_update": (_a_delete, 1, _b_bulk_update, True),
    "save-autocommit_save": (_a_save, 1, _b_autocommit_save, False),
}


@pytest.mark.parametrize("writes", list(INTERLEAVINGS))
def test_writers_commit_in_id_order_and_the_reader_misses_nothing(
    db_alias: str, writes: str
) -> None:
    alias = db_alias
    ensure_lock_row(alias)
    write_a, a_count, write_b, b_atomic = INTERLEAVINGS[writes]
    # Rows the update and delete paths work on, written before the reader's cursor.
    Country.objects.using(alias).create(code="zz", name="before")
    b_row = Tag.objects.using(alias).create(slug="b0")
    cursor = last_id(alias)

    a_wrote = threading.Event()
    release_a = threading.Event()
    b_started = threading.Event()
    b_committed = threading.Event()
    a_ids: list[int] = []

    def writer_a() -> None:
        with transaction.atomic(using=alias):
            write_a(alias)
            # A's own connection sees its uncommitted events: the ids it allocated.
            a_ids.extend(ids_after(alias, cursor))
            a_wrote.set()
            if not release_a.wait(JOIN_TIMEOUT):
                raise AssertionError("writer A was never released")

    def writer_b() -> None:
        b_started.set()
        if b_atomic:
            with transaction.atomic(using=alias):
                write_b(alias, b_row)
        else:
            assert connections[alias].get_autocommit()
            write_b(alias, b_row)
        b_committed.set()

    a = Worker("writer-A", writer_a)
    b = Worker("writer-B", writer_b)
    try:
        a.start()
        wait_for(a_wrote, a, "write")
        assert len(a_ids) == a_count, a_ids

        b.start()
        assert b_started.wait(JOIN_TIMEOUT)
        # B must wait for A's outbox lock: if it could commit now, its event
        # (id above A's) would become visible before A's.
        assert not b_committed.wait(BLOCKED_FOR), (
            f"writer B committed while A, holding event ids {a_ids}, was still open"
        )
        assert b.is_alive() and b.error is None, f"writer B failed instead of waiting: {b.error!r}"

        # Meanwhile a reader sees neither transaction and keeps its cursor.
        page = feed.read(cursor, 100, using=alias)
        assert page.events == []
        assert page.last_seq == cursor
    finally:
        release_a.set()
        finish_all([a, b])

    assert b_committed.is_set()
    table = ids_after(alias, cursor)
    assert table[:a_count] == a_ids, "A's events must come before B's"
    assert len(table) == a_count + 1

    seen = follow(alias, cursor, limit=1)
    assert [e["seq"] for e in seen] == table  # each once, in id order
    assert [e["model"] for e in seen] == ["testapp.country"] * a_count + ["testapp.tag"]
    assert seen[-1]["key"] == ["b"]


# ---------------------------------------------------------------- control: no lock, a gap


@pytest.mark.parametrize("db_alias", ["postgres", "mariadb"], indirect=True)
def test_control_writers_without_the_lock_make_a_naive_reader_skip_an_event(db_alias: str) -> None:
    """Bypass capture (and so the lock) and write events directly: the gap appears.

    This shows that the interleaving used above really produces out-of-order
    commits on this server and that the reader's view catches the loss, so the
    gap-free results above are the lock's doing. (SQLite cannot run two
    writers at once, so it has no such gap and is not part of this control.)
    """
    alias = db_alias
    cursor = last_id(alias)

    a_wrote = threading.Event()
    release_a = threading.Event()
    a_ids: list[int] = []
    b_ids: list[int] = []

    def unlocked_event(key: str) -> int:
        return Event.objects.using(alias).create(model="testapp.tag", op=Event.UPSERT, key=[key]).id

    def writer_a() -> None:
        with transaction.atomic(using=alias):
            a_ids.append(unlocked_event("a"))
            a_wrote.set()
            if not release_a.wait(JOIN_TIMEOUT):
                raise AssertionError("writer A was never released")

    def writer_b() -> None:
        with transaction.atomic(using=alias):
            b_ids.append(unlocked_event("b"))

    a = Worker("writer-A", writer_a)
    b = Worker("writer-B", writer_b)
    naive_seen: list[int] = []
    try:
        a.start()
        wait_for(a_wrote, a, "write")
        b.start()
        b.finish()  # B commits while A is still open: nothing serializes them

        # A naive reader: everything after its cursor, then cursor = highest id seen.
        page = feed.read(cursor, 100, using=alias)
        naive_seen.extend(e["seq"] for e in page.events)
        naive_cursor = page.last_seq
    finally:
        release_a.set()
        a.finish()

    [a_id], [b_id] = a_ids, b_ids
    assert a_id < b_id, "A took its id first"
    assert naive_seen == [b_id]
    assert naive_cursor == b_id
    # A has committed now, but its event is behind the naive reader's cursor.
    later = feed.read(naive_cursor, 100, using=alias)
    naive_seen.extend(e["seq"] for e in later.events)
    assert ids_after(alias, cursor) == [a_id, b_id]
    assert a_id not in naive_seen, "the unserialized interleaving produced no gap"


# ---------------------------------------------------------------- randomized stress

WRITERS = 4
TRANSACTIONS = 25
STRESS_BUDGET = 20.0  # seconds per alias


def test_stress_overlapping_writers_reader_sees_every_event_once_in_order(db_alias: str) -> None:
    alias = db_alias
    seed = int(os.environ.get("CFS_STRESS_SEED") or random.randrange(2**32))
    about = f"(alias {alias}, CFS_STRESS_SEED={seed})"
    ensure_lock_row(alias)
    start_cursor = last_id(alias)
    deadline = time.monotonic() + STRESS_BUDGET

    writers_done = threading.Event()
    rows_written = [0] * WRITERS
    seen: list[int] = []
    pages_while_writing = 0

    def writer(number: int) -> None:
        # Transactions of 1-3 rows, and saves in autocommit between them.
        rng = random.Random(seed + number)
        for t in range(TRANSACTIONS):
            if time.monotonic() > deadline:
                raise AssertionError(f"writer {number} ran out of time at transaction {t}")
            if rng.random() < 0.3:
                # A save in autocommit (one statement on PostgreSQL).
                Tag(slug=f"w{number}-t{t}").save(using=alias)
                rows_written[number] += 1
                continue
            count = rng.randint(1, 3)
            with transaction.atomic(using=alias):
                # Sleeps before, between and after the writes make transactions
                # overlap and, without the lock, commit out of id order.
                time.sleep(rng.uniform(0, 0.003))
                for r in range(count):
                    model = rng.choice((Tag, Category))
                    model.objects.using(alias).create(slug=f"w{number}-t{t}-r{r}")
                    time.sleep(rng.uniform(0, 0.003))
            rows_written[number] += count

    def reader() -> None:
        nonlocal pages_while_writing
        cursor = start_cursor
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"reader ran out of time at cursor {cursor}")
            finished = writers_done.is_set()
            page = feed.read(cursor, 7, using=alias)
            seqs = [int(e["seq"]) for e in page.events]
            assert page.since == cursor
            assert page.last_seq == (seqs[-1] if seqs else cursor)
            seen.extend(seqs)
            cursor = page.last_seq
            if seqs and not finished:
                pages_while_writing += 1
            if not seqs:
                if finished:
                    return  # drained after every writer committed
                time.sleep(0.001)

    writers = [Worker(f"writer-{n}", lambda n=n: writer(n)) for n in range(WRITERS)]
    follower = Worker("reader", reader)
    follower.start()
    for w in writers:
        w.start()
    try:
        finish_all(writers, max(0.1, deadline - time.monotonic()))
    finally:
        writers_done.set()
        follower.finish(max(0.1, deadline - time.monotonic()) + 5)

    table = ids_after(alias, start_cursor)
    assert len(table) == sum(rows_written), about
    duplicates = sorted({i for i in seen if seen.count(i) > 1})
    assert not duplicates, f"events delivered twice: {duplicates} {about}"
    missing = sorted(set(table) - set(seen))
    assert not missing, f"events the reader never saw: {missing} {about}"
    assert seen == table, f"events out of id order {about}"
    # The reader really followed the writers rather than reading once at the end.
    assert pages_while_writing > 0, about


# ---------------------------------------------------------------- the lock row after a flush


FIRST_WRITERS = 4
FIRST_WRITER_ROUNDS = 6


@pytest.mark.parametrize("db_alias", ["mariadb"], indirect=True)
def test_writers_that_find_the_lock_row_missing_neither_deadlock_nor_leave_a_gap(
    db_alias: str,
) -> None:
    """``manage.py flush`` (and every transactional test) empties ``OutboxState``.

    On MySQL/MariaDB ``outbox.lock`` then has to create the row. Writers that
    find it missing at the same moment must still queue up behind each other:
    none may fail (e.g. with a deadlock) and the feed must stay in order. The
    writers start together from a barrier; the race depends on timing, so it
    runs for several rounds (when the row was created with ``get_or_create``
    inside the writers' transactions, the first round already deadlocked in
    most runs).
    """
    alias = db_alias
    cursor = last_id(alias)
    for round_ in range(FIRST_WRITER_ROUNDS):
        OutboxState.objects.using(alias).filter(id=1).delete()
        barrier = threading.Barrier(FIRST_WRITERS)

        def writer(number: int, round_: int = round_, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(JOIN_TIMEOUT)
            with transaction.atomic(using=alias):
                Tag.objects.using(alias).create(slug=f"r{round_}-{number}")
                time.sleep(0.05)  # the others arrive while this one holds the lock

        writers = [Worker(f"writer-{n}", lambda n=n: writer(n)) for n in range(FIRST_WRITERS)]
        for w in writers:
            w.start()
        try:
            finish_all(writers)
        except AssertionError as exc:
            raise AssertionError(f"round {round_}: {exc}") from exc
    seen = follow(alias, cursor, limit=5)
    assert [e["seq"] for e in seen] == ids_after(alias, cursor)
    assert len(seen) == FIRST_WRITERS * FIRST_WRITER_ROUNDS


@pytest.mark.parametrize("db_alias", ["mariadb"], indirect=True)
def test_a_repeatable_read_writer_that_finds_the_lock_row_missing_does_not_wait_on_itself(
    db_alias: str,
) -> None:
    """After a flush, a lone writer whose connection runs REPEATABLE READ.

    Under REPEATABLE READ a locking read of the missing row leaves a gap lock
    where the row would go, and a consistent read keeps showing the row
    missing for the rest of the transaction. Creating the row from a second
    connection after either then waits on the writer's own locks, until
    ``innodb_lock_wait_timeout`` (50 s by default) fails the write.
    """
    alias = db_alias
    OutboxState.objects.using(alias).filter(id=1).delete()
    cursor = last_id(alias)
    committed = threading.Event()

    def writer() -> None:
        with connections[alias].cursor() as c:
            c.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with transaction.atomic(using=alias):
            Tag.objects.using(alias).create(slug="rr")
        committed.set()

    w = Worker("writer", writer)
    w.start()
    if not committed.wait(4 * BLOCKED_FOR):
        # End the wait now rather than after the server's lock wait timeout.
        for query in _queries_waiting_on(alias, OutboxState._meta.db_table):
            with connections[alias].cursor() as c:
                c.execute(f"KILL QUERY {int(query)}")
        w.join(JOIN_TIMEOUT)
        pytest.fail(
            f"the writer waited on a lock its own transaction holds "
            f"(ended by KILL QUERY after {4 * BLOCKED_FOR} s: {w.error!r})"
        )
    finish_all([w])
    assert [e["key"] for e in follow(alias, cursor, limit=10)] == [["rr"]]


def _queries_waiting_on(alias: str, table: str) -> list[int]:
    """Ids of other connections of this test database with a statement on ``table`` running."""
    with connections[alias].cursor() as c:
        c.execute(
            "SELECT id FROM information_schema.processlist "
            "WHERE db = DATABASE() AND id <> CONNECTION_ID() AND info LIKE %s",
            [f"%{table}%"],
        )
        return [row[0] for row in c.fetchall()]


@pytest.mark.skipif(django.VERSION < (5, 1), reason="transaction_mode needs Django 5.1")
def test_sqlite_immediate_transactions_need_no_lock_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With OPTIONS['transaction_mode'] = 'IMMEDIATE' (the W001 setting) BEGIN takes
    SQLite's write lock, so ``outbox.lock`` sends nothing more, and the lock is held
    all the same: another connection cannot write until the transaction ends.

    A connection of its own, outside Django's handler (the test runner admits no
    alias added at run time), begun the way ``atomic()`` begins one on SQLite."""
    from django.db.backends.sqlite3.base import DatabaseWrapper
    from django.test.utils import CaptureQueriesContext

    path = tmp_path / "immediate.sqlite3"
    config = {
        **connections.settings["default"],
        "NAME": str(path),
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 0.1},
    }
    wrapper = DatabaseWrapper(config, alias="immediate")
    monkeypatch.setattr(outbox, "connections", {"immediate": wrapper})
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("CREATE TABLE t (x INTEGER)")
        wrapper.in_atomic_block = True
        wrapper._start_transaction_under_autocommit()  # what atomic() sends: BEGIN IMMEDIATE
        with CaptureQueriesContext(wrapper) as queries:
            outbox.lock("immediate")
        assert len(queries) == 0
        other = sqlite3.connect(path, timeout=0.1)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("INSERT INTO t VALUES (1)")
        finally:
            other.close()
    finally:
        wrapper.in_atomic_block = False
        with wrapper.cursor() as cursor:
            cursor.execute("ROLLBACK")
        wrapper.close()
