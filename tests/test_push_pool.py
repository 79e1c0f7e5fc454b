"""The inline backend's delivery pool with many targets, on SQLite, PostgreSQL and MariaDB.

The source is this process: writes on the database under test schedule deliveries
after commit, which the pool's threads POST to a real HTTP server on loopback
(tests/receivers.py: one server answering for every Target at its own path, checking
each request's signature and framing as a target site does). Each test gets a pool of
its own (``CHANGEFEED_SYNC_DELIVERY_WORKERS`` = 3), stopped at its end, so the
threads it starts can be counted.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, transaction

from changefeed_sync.models import Target
from changefeed_sync.source import feed, push
from changefeed_sync.source.delivery import inline
from tests.receivers import Receiver, running
from tests.testapp.models import Country, Language

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(180),
]

SECRET = "pool-test-secret-0123456789abcdef0123456789abcdef"
WORKERS = 3


@pytest.fixture
def deliveries(settings: Any) -> Iterator[inline._Pool]:
    settings.CHANGEFEED_SYNC_DELIVERY_BACKEND = "changefeed_sync.source.delivery.inline.InlineBackend"
    settings.CHANGEFEED_SYNC_DELIVERY_WORKERS = WORKERS
    previous, inline._pool = inline._pool, inline._Pool()
    push.forget_targets()
    try:
        yield inline._pool
    finally:
        inline._pool.wait_idle(10)
        inline._pool.stop()
        inline._pool = previous
        push.forget_targets()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running(SECRET) as server:
        yield server


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Positions the feed was read from by deliveries (a spy: the real read runs)."""
    calls: list[int] = []
    real = feed.read

    def read(since: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(since)
        return real(since, *args, **kwargs)

    monkeypatch.setattr(feed, "read", read)
    return calls


def make_targets(
    alias: str, receiver: Receiver, count: int, prefix: str = "t", **fields: Any
) -> list[str]:
    # The outbox's state row, which a flushed test database lacks, is made now, by one
    # thread: made by the first two sequencers at once (the test's and a worker's) it
    # failed on SQLite with "database is locked".
    feed.head(alias)
    names = [f"{prefix}{i:03d}" for i in range(count)]
    Target.objects.using(alias).bulk_create(
        Target(name=name, secrets=SECRET, webhook_url=receiver.webhook_url(name), **fields)
        for name in names
    )
    push.forget_targets()
    return names


def push_threads() -> dict[int, str]:
    return {
        t.ident or 0: t.name for t in threading.enumerate() if t.name.startswith("changefeed-push")
    }


def rows(alias: str, names: list[str]) -> list[Target]:
    return list(Target.objects.using(alias).filter(name__in=names))


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class ConnectionCount:
    """The server's connections to the test database, sampled every few ms from a
    connection of its own (PostgreSQL: pg_stat_activity; MariaDB: the process list)."""

    QUERIES = {
        "postgresql": "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()",
        "mysql": "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE()",
    }

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.most = 0
        self._stop = threading.Event()
        self.baseline = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        connection = connections[self.alias]
        with connection.cursor() as cursor:
            cursor.execute(self.QUERIES[connection.vendor])
            return int(cursor.fetchone()[0])

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.most = max(self.most, self._sample())
                time.sleep(0.005)
        finally:
            connections.close_all()

    def stop(self) -> int:
        """The most connections seen beyond those open before it started."""
        self._stop.set()
        self._thread.join(10)
        return self.most - self.baseline


def test_one_event_reaches_100_targets_from_one_read(
    db_alias: str, deliveries: inline._Pool, receiver: Receiver, reads: list[int]
) -> None:
    names = make_targets(db_alias, receiver, 100)
    # Slow answers, so that the round takes a while: connections are counted meanwhile.
    receiver.delay = 0.01
    counting = ConnectionCount(db_alias) if db_alias != "default" else None
    before = push_threads()

    Country.objects.using(db_alias).create(code="fr", name="France")
    seq = feed.head(db_alias)
    receiver.wait_for_seq(names, seq)

    extra_connections = counting.stop() if counting else None
    assert receiver.refused == []
    for name in names:  # one event, one POST each, signed for its own name
        assert [(r.since, r.last_seq, r.keys) for r in receiver.deliveries[name]] == [
            (0, seq, [["fr"]])
        ]
    # The 100 targets waited at the same position: the feed was read once for all
    # (a later round may look for more after ``seq``).
    assert reads.count(0) == 1 and set(reads) <= {0, seq}, reads
    started = {name for ident, name in push_threads().items() if ident not in before}
    assert started == {f"changefeed-push-worker-{i}" for i in range(1, WORKERS + 1)} | {
        "changefeed-push-recorder"
    }
    if extra_connections is not None:
        # Each thread has at most one connection: not one per target.
        assert 1 <= extra_connections <= WORKERS + 1, extra_connections
    wait_for(lambda: all(t.delivered_seq == seq for t in rows(db_alias, names)),
             "every Target row to record the delivery")
    assert all(t.failures == 0 and t.last_delivery_at is not None for t in rows(db_alias, names))


def test_the_threads_do_not_grow_with_the_targets(
    deliveries: inline._Pool, receiver: Receiver, settings: Any
) -> None:
    started: dict[int, set[str]] = {}
    for count, prefix in ((10, "small"), (100, "big")):
        Target.objects.update(active=False)
        names = make_targets("default", receiver, count, prefix=prefix)
        inline._pool = inline._Pool()
        before = push_threads()
        Country.objects.create(code=prefix[:2], name=prefix)
        receiver.wait_for_seq(names, feed.head("default"))
        started[count] = set(push_threads()) - set(before)
        assert len(started[count]) == WORKERS + 1, push_threads()
        inline._pool.wait_idle(10)
        inline._pool.stop()
    assert len(started[100]) == len(started[10])


def test_each_target_gets_its_deliveries_in_order_one_at_a_time(
    db_alias: str, deliveries: inline._Pool, receiver: Receiver
) -> None:
    """Four threads commit at once; every commit wakes every target. Each target must
    see contiguous spans, never two requests at once, every event once."""
    names = make_targets(db_alias, receiver, 8)
    jitter = random.Random(12)
    lock = threading.Lock()

    def delay(name: str) -> float:
        with lock:
            return jitter.uniform(0, 0.01)

    receiver.delay = delay
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(8):
                with transaction.atomic(using=db_alias):
                    Country.objects.using(db_alias).create(code=f"{worker}{i}", name="x")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(60)
    assert not errors, errors
    head = feed.head(db_alias)
    assert head == 32
    receiver.wait_for_seq(names, head)

    assert receiver.refused == []
    for name in names:
        spans = receiver.spans(name)
        assert spans[0][0] == 0 and spans[-1][1] == head
        assert all(b[0] == a[1] for a, b in zip(spans, spans[1:])), (name, spans)
        assert receiver.most_in_flight[name] == 1, name
        keys = [k for r in receiver.deliveries[name] for k in r.keys]
        assert sorted(keys) == sorted([f"{w}{i}"] for w in range(4) for i in range(8))
    # The commits came faster than the deliveries: targets were sent several at once.
    assert any(len(receiver.spans(n)) < 32 for n in names)


def test_a_failing_target_waits_out_its_backoff_while_the_others_go_on(
    deliveries: inline._Pool, receiver: Receiver, settings: Any
) -> None:
    settings.CHANGEFEED_SYNC_DELIVERY_RETRY_DELAYS = [0, 60]
    names = make_targets("default", receiver, 10)
    failing, others = names[0], names[1:]
    receiver.refuse[failing] = 503

    Country.objects.create(code="aa")
    first = feed.head("default")
    receiver.wait_for_seq(others, first)
    wait_for(lambda: Target.objects.get(name=failing).failures == 1, "the failure to be recorded")
    row = Target.objects.get(name=failing)
    assert "HTTP 503" in row.last_error and row.next_attempt_at is not None
    assert receiver.attempts[failing] == 1

    # A commit during the backoff: the others get it, the failing target is not tried.
    Country.objects.create(code="bb")
    second = feed.head("default")
    receiver.wait_for_seq(others, second)
    time.sleep(0.3)
    assert receiver.attempts[failing] == 1

    # "Retry delivery now" ends the backoff: everything in one batch.
    del receiver.refuse[failing]
    push.retry_now(Target.objects.filter(name=failing))
    receiver.wait_for_seq([failing], second)
    assert receiver.spans(failing) == [(0, second)]
    wait_for(lambda: Target.objects.get(name=failing).failures == 0, "the success to be recorded")
    assert all(t.delivered_seq == second for t in rows("default", names))


def test_targets_with_other_models_are_read_for_apart(
    db_alias: str, deliveries: inline._Pool, receiver: Receiver, reads: list[int]
) -> None:
    everything = make_targets(db_alias, receiver, 3, prefix="all")
    countries = make_targets(db_alias, receiver, 3, prefix="cty", model_labels=["testapp.country"])
    with transaction.atomic(using=db_alias):
        fr = Country.objects.using(db_alias).create(code="fr")
        Language.objects.using(db_alias).create(country=fr, code="fr")
    head = feed.head(db_alias)
    receiver.wait_for_seq(everything, head)
    receiver.wait_for_seq(countries, head - 1)
    # One read per selection, not per target (two writes woke them twice: a second
    # round may look for more after what they got).
    assert reads.count(0) == 2 and set(reads) <= {0, head - 1, head}, reads
    for name in everything:
        assert [r.keys for r in receiver.deliveries[name]] == [[["fr"], ["fr", "fr"]]]
    for name in countries:
        assert [r.keys for r in receiver.deliveries[name]] == [[["fr"]]]
