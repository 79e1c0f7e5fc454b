"""Writers never wait for each other, and the feed stays gap-free (anchors:
"The visibility gap", "Writers that never wait").

An event's id is taken when its row is inserted but becomes visible only when
its transaction commits, so ids commit out of order. The feed therefore does
not serve ids: ``sequencer.sequence`` gives each committed event its position
afterwards, one batch at a time under the sequencer's lock, and a reader asks
for positions. These tests use real transactions on separate connections (one
per thread):

* a deterministic interleaving per capture path: A holds an open transaction
  with events, B writes and commits without waiting for A (PostgreSQL and
  MariaDB; SQLite admits one writer at a time by itself), a reader in between
  sees B's events and not A's, afterwards A's, each once, at consecutive
  positions;
* a control showing that reading by id really does lose A's event under that
  interleaving, so the tests above can detect a gap;
* a randomized stress run: overlapping writers and a reader following the
  feed with small pages must see every event exactly once, positions
  consecutive;
* a Hypothesis property: for any schedule of writes, commits, rollbacks and
  reads over several connections, reads return consecutive positions, no
  position twice, every committed event once and no rolled-back one;
* sequencers that find the state row missing (after a flush) neither
  deadlock nor wait on their own locks.
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
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from changefeed_sync import outbox
from changefeed_sync.models import Event, OutboxState
from changefeed_sync.source import feed, sequencer
from tests.testapp.models import Category, Copy, Country, Language, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(120),
]

# Upper bound for any wait on another thread: a hang fails instead of blocking the run.
JOIN_TIMEOUT = 30.0
# How long a blocked writer must stay blocked to count as "waiting".
BLOCKED_FOR = 0.5
# A writer that does not wait commits well within this.
COMMITS_WITHIN = 5.0


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
    """Committed events inserted after id ``cursor``, in id (insertion) order."""
    return list(
        Event.objects.using(alias).filter(id__gt=cursor).order_by("id").values_list("id", flat=True)
    )


def head(alias: str) -> int:
    return feed.head(alias)


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


def assert_consecutive(positions: list[int], after: int, about: str = "") -> None:
    """Positions are exactly after+1, after+2, ...: none skipped, none twice."""
    expected = list(range(after + 1, after + 1 + len(positions)))
    assert positions == expected, f"positions {positions} are not {expected} {about}"


def ensure_lock_row(alias: str) -> None:
    """The sequencer's row; the migration creates it, a flush removes it."""
    OutboxState.objects.using(alias).get_or_create(id=1)


# ---------------------------------------------------------------- A stays open, B goes on

# Each capture path, as the writer whose transaction stays open (A, on
# countries) and as the one that must not wait for it (B, on tags).


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
    # Outside any transaction: on PostgreSQL one statement with its event.
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
def test_a_writer_does_not_wait_for_another_open_transaction_and_the_reader_misses_nothing(
    db_alias: str, writes: str
) -> None:
    alias = db_alias
    one_writer = connections[alias].vendor == "sqlite"  # SQLite's own rule, not ours
    ensure_lock_row(alias)
    write_a, a_count, write_b, b_atomic = INTERLEAVINGS[writes]
    # Rows the update and delete paths work on, written before the reader's cursor.
    Country.objects.using(alias).create(code="zz", name="before")
    b_row = Tag.objects.using(alias).create(slug="b0")
    cursor = head(alias)

    a_wrote = threading.Event()
    release_a = threading.Event()
    b_committed = threading.Event()
    a_ids: list[int] = []

    def writer_a() -> None:
        start = last_id(alias)
        with transaction.atomic(using=alias):
            write_a(alias)
            # A's own connection sees its uncommitted events (on MySQL/MariaDB,
            # inserted at commit or, as here, before the transaction reads them).
            a_ids.extend(ids_after(alias, start))
            a_wrote.set()
            if not release_a.wait(JOIN_TIMEOUT):
                raise AssertionError("writer A was never released")

    def writer_b() -> None:
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
        if one_writer:
            assert not b_committed.wait(BLOCKED_FOR), "SQLite let a second writer commit"
            page = feed.read(cursor, 100, using=alias)
            assert page.events == [] and page.last_seq == cursor
        else:
            # B writes other rows: nothing may make it wait for A.
            assert b_committed.wait(COMMITS_WITHIN), (
                f"writer B waited for A (open, holding events {a_ids}): {b.error!r}"
            )
            b.finish()
            page = feed.read(cursor, 100, using=alias)
            assert [e["model"] for e in page.events] == ["testapp.tag"], page.events
            assert page.events[0]["key"] == ["b"]
            assert_consecutive([e["seq"] for e in page.events], cursor)
    finally:
        release_a.set()
        finish_all([a, b])

    seen = follow(alias, cursor, limit=1)
    assert_consecutive([e["seq"] for e in seen], cursor)
    models = [e["model"] for e in seen]
    if one_writer:
        assert models == ["testapp.country"] * a_count + ["testapp.tag"]
    else:  # B committed first, so it comes first
        assert models == ["testapp.tag"] + ["testapp.country"] * a_count
    assert not Event.objects.using(alias).filter(position__isnull=True).exists()


# ---------------------------------------------------------------- control: ids commit out of order


@pytest.mark.parametrize("db_alias", ["postgres", "mariadb"], indirect=True)
def test_control_a_reader_of_ids_would_skip_an_event_that_the_feed_serves(db_alias: str) -> None:
    """The interleaving above really commits ids out of order on this server: a
    reader that followed ids (what positions were before the sequencer) would
    move past A's event while A was open and never see it. The feed, reading
    positions, serves it. (SQLite runs one writer at a time: no such gap.)"""
    alias = db_alias
    start_id = last_id(alias)
    cursor = head(alias)

    a_wrote = threading.Event()
    release_a = threading.Event()
    a_ids: list[int] = []
    b_ids: list[int] = []

    def event(key: str) -> int:
        # Written directly: capture on MySQL/MariaDB inserts events at commit,
        # which would hide the out-of-order ids this control is about.
        return Event.objects.using(alias).create(model="testapp.tag", op=Event.UPSERT, key=[key]).id

    def writer_a() -> None:
        with transaction.atomic(using=alias):
            a_ids.append(event("ctl-a"))
            a_wrote.set()
            if not release_a.wait(JOIN_TIMEOUT):
                raise AssertionError("writer A was never released")

    def writer_b() -> None:
        with transaction.atomic(using=alias):
            b_ids.append(event("ctl-b"))

    a = Worker("writer-A", writer_a)
    b = Worker("writer-B", writer_b)
    try:
        a.start()
        wait_for(a_wrote, a, "write")
        b.start()
        b.finish()  # B commits while A is still open
        naive_seen = ids_after(alias, start_id)  # what an id reader sees now
        naive_cursor = max(naive_seen)
        # The feed, meanwhile, serves B at the next position, and nothing of A.
        page = feed.read(cursor, 100, using=alias)
        assert [e["key"] for e in page.events] == [["ctl-b"]]
    finally:
        release_a.set()
        a.finish()

    [a_id], [b_id] = a_ids, b_ids
    assert a_id < b_id, "A took its id first"
    assert naive_seen == [b_id] and naive_cursor == b_id
    assert a_id not in ids_after(alias, naive_cursor), "the interleaving produced no gap"
    seen = follow(alias, cursor, limit=1)
    assert [e["key"] for e in seen] == [["ctl-b"], ["ctl-a"]]
    assert_consecutive([e["seq"] for e in seen], cursor)


# ---------------------------------------------------------------- what an event reads, another changes


def _rename_country(alias: str) -> None:
    country = Country.objects.using(alias).get(code="fr")
    country.code = "fx"
    country.save(using=alias)


def _tag_the_copy(alias: str) -> None:
    Copy.objects.using(alias).get(key="k0").tags.add(Tag.objects.using(alias).get(slug="t-b"))


def _a_copy(alias: str) -> None:
    Copy.objects.using(alias).create(language=Language.objects.using(alias).get(), key="k1")


def _a_tag(alias: str) -> None:
    Copy.objects.using(alias).get(key="k0").tags.add(Tag.objects.using(alias).get(slug="t-a"))


# (A's write, left open; B's write, on other rows than A's but changing what A's event says)
READ_WRITE: dict[str, tuple[Callable[[str], None], Callable[[str], None]]] = {
    # A's copy names its language by key (fr, fr, k1); B renames the country in it.
    "key-through-a-parent-renamed": (_a_copy, _rename_country),
    # A and B each add a tag to one copy; each event lists the copy's tags.
    "many-to-many-added-twice": (_a_tag, _tag_the_copy),
}


@pytest.mark.parametrize("case", list(READ_WRITE))
@pytest.mark.parametrize("db_alias", ["postgres", "mariadb"], indirect=True)
def test_an_event_and_a_change_of_what_it_reads_replicate_in_an_order_that_agrees(
    db_alias: str, case: str
) -> None:
    """A's open transaction built an event from rows B now changes. Whatever
    waits for whom, the feed's order must be one the events agree with: the
    whole feed, applied to an empty target, gives the source's state.
    (Without locks on what an event reads, B committed first and the target
    met A's copy under a language key that no longer existed, or lost a tag.)"""
    from tests.helpers import data_source, pump, state

    alias = db_alias
    write_a, write_b = READ_WRITE[case]
    country = Country.objects.using(alias).create(code="fr")
    language = Language.objects.using(alias).create(country=country, code="fr")
    Copy.objects.using(alias).create(language=language, key="k0")
    Tag.objects.using(alias).create(slug="t-a")
    Tag.objects.using(alias).create(slug="t-b")

    a_wrote = threading.Event()
    release_a = threading.Event()
    b_done = threading.Event()

    def writer_a() -> None:
        with transaction.atomic(using=alias):
            write_a(alias)
            a_wrote.set()
            if not release_a.wait(JOIN_TIMEOUT):
                raise AssertionError("writer A was never released")

    def writer_b() -> None:
        with transaction.atomic(using=alias):
            write_b(alias)
        b_done.set()

    a = Worker("writer-A", writer_a)
    b = Worker("writer-B", writer_b)
    try:
        a.start()
        wait_for(a_wrote, a, "write")
        b.start()
        # Give B every chance to commit first; whatever it committed gets its
        # positions now, before A's.
        b_done.wait(BLOCKED_FOR)
        feed.read(head(alias), 100, using=alias)
    finally:
        release_a.set()
        finish_all([a, b])

    target = "default"
    ds = data_source(target)
    pump(alias, target, ds, limit=1)
    assert state(target) == state(alias)


# ---------------------------------------------------------------- randomized stress

WRITERS = 4
TRANSACTIONS = 25
STRESS_BUDGET = 20.0  # seconds per alias


def test_stress_overlapping_writers_reader_sees_every_event_once_in_order(db_alias: str) -> None:
    alias = db_alias
    seed = int(os.environ.get("CFS_STRESS_SEED") or random.randrange(2**32))
    about = f"(alias {alias}, CFS_STRESS_SEED={seed})"
    ensure_lock_row(alias)
    start_id = last_id(alias)
    start_cursor = head(alias)
    deadline = time.monotonic() + STRESS_BUDGET

    writers_done = threading.Event()
    rows_written = [0] * WRITERS
    seen: list[dict[str, Any]] = []
    pages_while_writing = 0

    def writer(number: int) -> None:
        # Transactions of 1-3 rows, saves in autocommit between them, and some rolled back.
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
            rollback = rng.random() < 0.15
            try:
                with transaction.atomic(using=alias):
                    # Sleeps before, between and after the writes make
                    # transactions overlap and commit out of id order.
                    time.sleep(rng.uniform(0, 0.003))
                    for r in range(count):
                        model = rng.choice((Tag, Category))
                        model.objects.using(alias).create(slug=f"w{number}-t{t}-r{r}")
                        time.sleep(rng.uniform(0, 0.003))
                    if rollback:
                        raise _RollBack
            except _RollBack:
                continue
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
            seen.extend(page.events)
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

    table = ids_after(alias, start_id)
    assert len(table) == sum(rows_written), about
    assert_consecutive([int(e["seq"]) for e in seen], start_cursor, about)
    by_key = sorted(tuple(e["key"]) for e in seen)
    stored = sorted(
        tuple(k) for k in Event.objects.using(alias).filter(id__gt=start_id).values_list("key", flat=True)
    )
    assert by_key == stored, f"the events read are not the events committed {about}"
    # The reader really followed the writers rather than reading once at the end.
    assert pages_while_writing > 0, about


class _RollBack(Exception):
    pass


# ---------------------------------------------------------------- any schedule (Hypothesis)

SESSIONS = 3


class Session(threading.Thread):
    """A connection of its own, driven one command at a time from the test.

    A command that does not return within ``COMMITS_WITHIN`` means the session
    waited on another one: for writers of different rows that is the failure
    these tests look for.
    """

    def __init__(self, alias: str, number: int) -> None:
        super().__init__(name=f"session-{number}", daemon=True)
        self.alias = alias
        self.number = number
        self.inbox: list[Callable[[], Any]] = []
        self.ready = threading.Condition()
        self.result: Any = None
        self.done = threading.Event()
        self.atomic: Any = None
        self.stopped = False

    def call(self, fn: Callable[[], Any]) -> Any:
        with self.ready:
            self.done.clear()
            self.inbox.append(fn)
            self.ready.notify()
        if not self.done.wait(COMMITS_WITHIN):
            raise AssertionError(f"session {self.number} waited on another session")
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def run(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.inbox:
                        self.ready.wait()
                    fn = self.inbox.pop(0)
                if fn is _STOP:
                    return
                try:
                    self.result = fn()
                except BaseException as exc:  # handed to the caller
                    self.result = exc
                self.done.set()
        finally:
            if self.atomic is not None:
                self.atomic.__exit__(_RollBack, _RollBack(), None)
            connections.close_all()
            self.done.set()

    # commands (run in the session's thread)
    def begin(self) -> None:
        self.atomic = transaction.atomic(using=self.alias)
        self.atomic.__enter__()

    def end(self, commit: bool) -> None:
        atomic, self.atomic = self.atomic, None
        if commit:
            atomic.__exit__(None, None, None)
        else:
            atomic.__exit__(_RollBack, _RollBack(), None)


def _STOP() -> None:  # a sentinel command
    pass


_command = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SESSIONS - 1), st.integers(1, 3)),
    st.tuples(st.just("commit"), st.integers(0, SESSIONS - 1), st.just(0)),
    st.tuples(st.just("rollback"), st.integers(0, SESSIONS - 1), st.just(0)),
    st.tuples(st.just("read"), st.just(0), st.integers(1, 4)),
)


@pytest.mark.parametrize("db_alias", ["postgres", "mariadb"], indirect=True)
def test_any_schedule_of_writers_gives_consecutive_positions_each_event_once(db_alias: str) -> None:
    """For any interleaving of transactions on several connections (writes,
    commits, rollbacks) and feed reads in between: no write waits, every read
    continues exactly where the last one stopped (no position skipped or
    served twice), and in the end the reader has every committed event once
    and no rolled-back one. (SQLite admits one writer at a time: not here.)"""
    alias = db_alias
    ensure_lock_row(alias)
    serial = iter(range(10**9))

    @settings(
        max_examples=int(os.environ.get("CFS_SCHEDULE_EXAMPLES", "25")),
        deadline=None,
        derandomize=not os.environ.get("CFS_FUZZ_RANDOM"),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each example costs threads
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(_command, min_size=1, max_size=25))
    def run(commands: list[tuple[str, int, int]]) -> None:
        sessions = [Session(alias, n) for n in range(SESSIONS)]
        for session in sessions:
            session.start()
        open_keys: list[list[str]] = [[] for _ in sessions]
        committed: list[str] = []
        rolled_back: list[str] = []
        cursor = start = head(alias)
        read: list[dict[str, Any]] = []

        def read_page(limit: int) -> None:
            nonlocal cursor
            page = feed.read(cursor, limit, using=alias)
            assert_consecutive([e["seq"] for e in page.events], cursor, f"after {commands}")
            read.extend(page.events)
            cursor = page.last_seq

        try:
            for op, n, count in commands:
                session = sessions[n]
                if op == "write":
                    if session.atomic is None:
                        session.call(session.begin)
                    slugs = [f"s{next(serial)}-{alias}" for _ in range(count)]
                    model = Tag if count % 2 else Category
                    session.call(
                        lambda slugs=slugs, model=model: [
                            model.objects.using(alias).create(slug=slug) for slug in slugs
                        ]
                    )
                    open_keys[n].extend(slugs)
                elif op in ("commit", "rollback") and session.atomic is not None:
                    session.call(lambda s=session, c=op == "commit": s.end(c))
                    (committed if op == "commit" else rolled_back).extend(open_keys[n])
                    open_keys[n] = []
                elif op == "read":
                    read_page(count)
            for n, session in enumerate(sessions):
                if session.atomic is not None:
                    session.call(lambda s=session: s.end(True))
                    committed.extend(open_keys[n])
            while True:
                before = cursor
                read_page(5)
                if cursor == before:
                    break
        finally:
            for session in sessions:
                with session.ready:
                    session.inbox.append(_STOP)
                    session.ready.notify()
            for session in sessions:
                session.join(JOIN_TIMEOUT)
        assert_consecutive([e["seq"] for e in read], start)
        keys = [e["key"][0] for e in read]
        assert sorted(keys) == sorted(committed), (keys, committed)
        assert not set(keys) & set(rolled_back)

    run()


# ---------------------------------------------------------------- the state row after a flush


FIRST_SEQUENCERS = 4
FIRST_SEQUENCER_ROUNDS = 6


@pytest.mark.parametrize("db_alias", ["postgres", "mariadb"], indirect=True)
def test_sequencers_that_find_the_state_row_missing_neither_deadlock_nor_leave_a_gap(
    db_alias: str,
) -> None:
    """``manage.py flush`` (and every transactional test) empties ``OutboxState``.

    The sequencer then has to create the row. Sequencers that find it missing
    at the same moment must still queue up behind each other: none may fail
    (e.g. with a deadlock) and positions must go on from the highest given,
    not start again (when the row was created with ``get_or_create`` inside
    the transactions, the first round already deadlocked in most runs on
    MariaDB). The threads start together from a barrier; the race depends on
    timing, so it runs for several rounds.
    """
    alias = db_alias
    cursor = head(alias)
    for round_ in range(FIRST_SEQUENCER_ROUNDS):
        OutboxState.objects.using(alias).filter(id=1).delete()
        barrier = threading.Barrier(FIRST_SEQUENCERS)

        def writer(number: int, round_: int = round_, barrier: threading.Barrier = barrier) -> None:
            Tag.objects.using(alias).create(slug=f"r{round_}-{number}")
            barrier.wait(JOIN_TIMEOUT)
            sequencer.sequence(alias)

        workers = [Worker(f"seq-{n}", lambda n=n: writer(n)) for n in range(FIRST_SEQUENCERS)]
        for w in workers:
            w.start()
        try:
            finish_all(workers)
        except AssertionError as exc:
            raise AssertionError(f"round {round_}: {exc}") from exc
    seen = follow(alias, cursor, limit=5)
    assert len(seen) == FIRST_SEQUENCERS * FIRST_SEQUENCER_ROUNDS
    assert_consecutive([e["seq"] for e in seen], cursor)


@pytest.mark.parametrize("db_alias", ["mariadb"], indirect=True)
def test_a_repeatable_read_sequencer_that_finds_the_state_row_missing_does_not_wait_on_itself(
    db_alias: str,
) -> None:
    """After a flush, a lone sequencer whose connection runs REPEATABLE READ.

    Under REPEATABLE READ a locking read of the missing row leaves a gap lock
    where the row would go, and a consistent read keeps showing the row
    missing for the rest of the transaction. Creating the row from a second
    connection after either then waits on the sequencer's own locks, until
    ``innodb_lock_wait_timeout`` (50 s by default) fails it.
    """
    alias = db_alias
    Tag.objects.using(alias).create(slug="rr")
    OutboxState.objects.using(alias).filter(id=1).delete()
    done = threading.Event()

    def run_sequencer() -> None:
        with connections[alias].cursor() as c:
            c.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        sequencer.sequence(alias)
        done.set()

    w = Worker("sequencer", run_sequencer)
    w.start()
    if not done.wait(4 * BLOCKED_FOR):
        # End the wait now rather than after the server's lock wait timeout.
        for query in _queries_waiting_on(alias, OutboxState._meta.db_table):
            with connections[alias].cursor() as c:
                c.execute(f"KILL QUERY {int(query)}")
        w.join(JOIN_TIMEOUT)
        pytest.fail(
            f"the sequencer waited on a lock its own transaction holds "
            f"(ended by KILL QUERY after {4 * BLOCKED_FOR} s: {w.error!r})"
        )
    finish_all([w])
    assert not Event.objects.using(alias).filter(position__isnull=True).exists()


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
