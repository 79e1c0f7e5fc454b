"""Long-polls without a thread per follower: the notifier, the shared reads after a wake,
the WSGI bound, and real servers holding many waiting followers.

The first half runs in this process against each database: one notifier per alias
wakes the waiting asyncio tasks of every event loop, asks for the head once per interval however
many wait and not at all when nobody does, survives its connection being killed;
followers woken together share one read, and failed reads are nobody else's. The
second half starts real servers on loopback (uvicorn, gunicorn's sync and gthread
workers) with the site of tests/longpoll_settings.py, which counts every SQL
statement its process sends, and holds 50 to 150 long-polls against them
(tests/loadclient.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.db import connections
from django.db.backends.signals import connection_created
from django.test import Client, override_settings

from changefeed_sync import outbox
from changefeed_sync.exceptions import CursorExpired
from changefeed_sync.models import DataSource, Event, OutboxState, Target
from changefeed_sync.signing import sign_request
from changefeed_sync.source import feed, longpoll, notifier
from tests import loadclient
from tests.conftest import require_alias
from tests.servers import Background, Site, free_port, wait_until
from tests.testapp.models import Country, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SECRET = "longpoll-secret-Yq7Rk2Vd9Lm4Xc8Pw3Tn6Bh1Jf5Gs0Za"
INTERVAL = 0.02  # CHANGEFEED_SYNC_FEED_POLL_INTERVAL's default


@pytest.fixture(autouse=True)
def _notifiers_stopped() -> Iterator[None]:
    """Each test starts without notifier threads, and ends with their connections closed
    (an open one would keep PostgreSQL from dropping the test database)."""
    notifier.shutdown()
    yield
    notifier.shutdown()


def _head(alias: str) -> int:
    return feed.head(alias)


def _until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return wait_until(predicate, timeout=timeout, interval=0.01, what=what)


class LoopThread:
    """An asyncio loop in a thread of its own, as a server's would be."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


@pytest.fixture
def other_loop() -> Iterator[LoopThread]:
    """A second server loop: waiters and readers of several loops share one notifier."""
    running = LoopThread()
    yield running
    running.close()


def _cached_read(*args: Any) -> Any:
    """``longpoll.acached_read`` from a thread with no loop, on a loop of its own."""
    return asyncio.run(longpoll.acached_read(*args))


# ---------------------------------------------------------------- the notifier


def test_one_notifier_wakes_the_tasks_of_every_loop(
    db_alias: str, loop: LoopThread, other_loop: LoopThread
) -> None:
    since = _head(db_alias)
    others = [other_loop.submit(notifier.await_head(db_alias, since, 10.0)) for _ in range(20)]
    tasks = [loop.submit(notifier.await_head(db_alias, since, 10.0)) for _ in range(20)]
    # Waiting beyond the position the event will get: it must not wake.
    beyond = loop.submit(notifier.await_head(db_alias, since + 1, 0.5))
    _until(lambda: notifier.stats(db_alias)["waiting"] == 41, "41 waiters")

    start = time.monotonic()
    Country.objects.using(db_alias).create(code="nw")
    woken = [task.result(5) for task in others]
    results = [task.result(5) for task in tasks]
    elapsed = time.monotonic() - start

    head = _head(db_alias)
    assert head == since + 1
    assert woken == [head] * 20
    assert results == [head] * 20
    assert elapsed < 1.0, elapsed  # one interval (20 ms) and a check, on a loaded machine
    assert beyond.result(5) is None  # timed out: the head did not pass since + 1
    assert notifier.stats(db_alias)["waiting"] == 0


def _checks_while(alias: str, waiters: int, loop: LoopThread, seconds: float) -> tuple[int, int]:
    """(checks, statements) of the notifier while ``waiters`` tasks wait ``seconds``."""
    since = _head(alias)
    tasks = [loop.submit(notifier.await_head(alias, since, 30.0)) for _ in range(waiters)]
    _until(lambda: notifier.stats(alias)["waiting"] == waiters, f"{waiters} waiters")
    before = notifier.stats(alias)
    time.sleep(seconds)
    after = notifier.stats(alias)
    for task in tasks:
        task.cancel()
    _until(lambda: notifier.stats(alias)["waiting"] == 0, "the waiters gone")
    return after["checks"] - before["checks"], after["statements"] - before["statements"]


def test_one_check_per_interval_however_many_wait(db_alias: str, loop: LoopThread) -> None:
    one = _checks_while(db_alias, 1, loop, 1.0)
    many = _checks_while(db_alias, 200, loop, 1.0)
    for checks, statements in (one, many):
        # At most one check per interval (and not none: they do look).
        assert 5 <= checks <= 1.0 / INTERVAL + 5, (one, many)
        assert statements <= 3 * checks, (one, many)  # feed.head: a few statements
    # 200 waiters cost what one does.
    assert many[0] <= one[0] * 1.5 + 5, (one, many)
    assert many[1] <= one[1] * 1.5 + 15, (one, many)


def test_the_notifier_rests_when_nobody_waits_and_starts_again(
    monkeypatch: pytest.MonkeyPatch, loop: LoopThread
) -> None:
    monkeypatch.setattr(notifier, "IDLE_EXIT", 0.5)
    since = _head("default")
    # nothing happened
    assert loop.submit(notifier.await_head("default", since, 0.2)).result(5) is None
    rested = notifier.stats("default")
    assert rested["running"] and rested["checks"] > 0
    time.sleep(0.3)  # nobody waits: no check at all
    assert notifier.stats("default")["statements"] == rested["statements"]
    # Nobody for IDLE_EXIT seconds: the thread ends (and closes its connection).
    _until(lambda: not notifier.stats("default")["running"], "the thread to end", timeout=3)
    assert notifier.stats("default")["threads_started"] == 1

    waiting = loop.submit(notifier.await_head("default", since, 10.0))
    _until(lambda: notifier.stats("default")["waiting"] == 1, "a new waiter")
    Country.objects.create(code="nx")
    assert waiting.result(5) == since + 1
    assert notifier.stats("default")["threads_started"] == 2


def _kill_other_connections(alias: str) -> int:
    """Kill every other session on this test database (the notifier's among them), as a
    database restart would."""
    with connections[alias].cursor() as cursor:
        if connections[alias].vendor == "postgresql":
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return int(cursor.fetchone()[0])
        cursor.execute(
            "SELECT id FROM information_schema.processlist "
            "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
        )
        ids = [row[0] for row in cursor.fetchall()]
        for session in ids:
            cursor.execute(f"KILL {int(session)}")
        return len(ids)


@pytest.mark.parametrize("alias", ["postgres", "mariadb"])
def test_the_notifier_survives_losing_its_connection(alias: str, loop: LoopThread) -> None:
    require_alias(alias)
    since = _head(alias)
    waiting = loop.submit(notifier.await_head(alias, since, 20.0))
    _until(lambda: notifier.stats(alias)["checks"] >= 3, "the notifier checking")
    assert _kill_other_connections(alias) >= 1
    _until(lambda: notifier.stats(alias)["errors"] >= 1, "a failed check")
    Country.objects.using(alias).create(code="rs")
    assert waiting.result(10) == since + 1  # it reconnected and kept checking
    assert notifier.stats(alias)["running"]


def test_poke_checks_at_once(loop: LoopThread) -> None:
    """A poke (events committed in this process) is not left for the next interval.
    The event is written as another process would (no commit hook of this one)."""
    since = _head("default")
    with override_settings(CHANGEFEED_SYNC_FEED_POLL_INTERVAL=5.0):
        waiting = loop.submit(notifier.await_head("default", since, 10))
        _until(lambda: notifier.stats("default")["waiting"] == 1, "a waiter")
        Event.objects.bulk_create([outbox.make_event("testapp.country", "upsert", ["pk"]).instance()])
        time.sleep(0.2)
        assert not waiting.done()  # the next check is seconds away
        start = time.monotonic()
        notifier.poke("default")
        woken = waiting.result(5)
    assert woken == since + 1
    assert time.monotonic() - start < 1.0
    notifier.poke("nowhere")  # no notifier of that alias: nothing to do, no error


# ---------------------------------------------------------------- reads after a wake


class Statements:
    """Every SQL statement this process sends while counting, from any thread."""

    def __init__(self) -> None:
        self.sql: list[str] = []
        self._lock = threading.Lock()

    def _record(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        with self._lock:
            self.sql.append(sql)
        return execute(sql, params, many, context)

    def _on_connection(self, sender: Any, connection: Any, **kwargs: Any) -> None:
        connection.execute_wrappers.append(self._record)

    def __enter__(self) -> Statements:
        connection_created.connect(self._on_connection)
        return self

    def __exit__(self, *exc: Any) -> None:
        connection_created.disconnect(self._on_connection)


def _in_fresh_threads(count: int, work: Callable[[], Any]) -> list[Any]:
    """``work()`` in ``count`` new threads at once (new connections: counted ones)."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work()
        except Exception as exc:  # noqa: BLE001 - returned for the assertions
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_followers_woken_together_share_one_read(db_alias: str, loop: LoopThread) -> None:
    since = _head(db_alias)
    Country.objects.using(db_alias).create(code="s1")
    Tag.objects.using(db_alias).create(slug="s2")
    head = _head(db_alias)
    source_id = "a" * 32
    alone = feed.read(since, 100, using=db_alias)
    # What one read sends, from a thread of its own as the pool's are.
    with Statements() as one:
        _in_fresh_threads(1, lambda: longpoll.read(db_alias, since, 100, None))
    assert one.sql

    # Followers of 50 loops (each in a thread of its own, as servers' workers would be).
    with Statements() as counted:
        pages = _in_fresh_threads(
            50, lambda: _cached_read(db_alias, source_id, since, 100, None, head)
        )
    assert all(page is pages[0] for page in pages), pages[:3]
    assert pages[0].events == alone.events and len(alone.events) == 2
    assert counted.sql == one.sql  # one read for all 50

    async def together() -> list[Any]:
        reads = [
            longpoll.acached_read(db_alias, source_id, since, 1, None, head) for _ in range(50)
        ]
        return await asyncio.gather(*reads)

    with Statements() as one:
        _in_fresh_threads(1, lambda: longpoll.read(db_alias, since, 1, None))
    with Statements() as counted:
        pages = loop.submit(together()).result(30)
    assert [page.events for page in pages] == [alone.events[:1]] * 50
    assert counted.sql == one.sql
    # Other models, limits or positions are other pages.
    only_tags = _cached_read(db_alias, source_id, since, 100, ["testapp.tag"], head)
    assert [e["model"] for e in only_tags.events] == ["testapp.tag"]


def test_a_replaced_outbox_is_read_again(db_alias: str) -> None:
    """A flushed outbox gives the same positions to other events and gets a new
    identity: a page read before is not served for it."""
    Country.objects.using(db_alias).create(code="o1")
    before = feed.check_cursor(0, db_alias).source_id
    head = _head(db_alias)
    page = _cached_read(db_alias, before, 0, 10, None, head)
    assert [e["key"] for e in page.events] == [["o1"]]
    Event.objects.using(db_alias).all().delete()
    OutboxState.objects.using(db_alias).all().delete()  # as a flush does
    Country.objects.using(db_alias).create(code="o2")
    after = feed.check_cursor(0, db_alias).source_id
    assert after != before and _head(db_alias) == head
    page = _cached_read(db_alias, after, 0, 10, None, head)
    assert [e["key"] for e in page.events] == [["o2"]]


def test_failed_reads_are_not_kept(db_alias: str) -> None:
    Country.objects.using(db_alias).create(code="f1")
    head = _head(db_alias)
    OutboxState.objects.using(db_alias).filter(id=1).update(pruned_through=head)
    source_id = feed.check_cursor(head, db_alias).source_id
    with pytest.raises(CursorExpired):
        _cached_read(db_alias, source_id, 0, 10, None, head)
    # Everyone who was waiting for that read gets his own answer, not its error.
    results = _in_fresh_threads(10, lambda: _cached_read(db_alias, source_id, 0, 10, None, head))
    assert all(isinstance(result, CursorExpired) for result in results), results
    # The cursor is valid again: the same read now reads, it does not repeat the error.
    OutboxState.objects.using(db_alias).filter(id=1).update(pruned_through=0)
    page = _cached_read(db_alias, source_id, 0, 10, None, head)
    assert [e["key"] for e in page.events] == [["f1"]]


# ---------------------------------------------------------------- the long-poll


def test_read_or_wait_for_the_events_of_its_models(
    loop: LoopThread, other_loop: LoopThread
) -> None:
    since = _head("default")
    first, second = (
        running.submit(
            longpoll.aread_or_wait(since, 10, 10.0, using="default", models=["testapp.tag"])
        )
        for running in (loop, other_loop)
    )
    _until(lambda: notifier.stats("default")["waiting"] == 2, "two long-polls waiting")
    Country.objects.create(code="nt")  # not theirs: they go on waiting
    _until(lambda: notifier.stats("default")["head"] == since + 1, "the head to move")
    _until(lambda: notifier.stats("default")["waiting"] == 2, "both waiting again")
    assert not first.done() and not second.done()
    start = time.monotonic()
    Tag.objects.create(slug="theirs")
    outcomes = [first.result(5), second.result(5)]
    assert time.monotonic() - start < 1.0
    for answer in outcomes:
        assert [(e["model"], e["key"]) for e in answer.page.events] == [("testapp.tag", ["theirs"])]
        assert not answer.refused


def test_waiting_slots_bound_the_waits(loop: LoopThread) -> None:
    since = _head("default")
    slots = longpoll.WaitSlots(lambda: 1)
    first = loop.submit(longpoll.aread_or_wait(since, 10, 5.0, using="default", slots=slots))
    _until(lambda: slots.taken == 1, "the slot taken")
    start = time.monotonic()
    second = loop.submit(
        longpoll.aread_or_wait(since, 10, 5.0, using="default", slots=slots)
    ).result(5)
    assert second.refused and second.page.events == []
    assert time.monotonic() - start < 1.0  # answered at once
    Country.objects.create(code="sl")
    assert [e["key"] for e in first.result(5).page.events] == [["sl"]]
    assert slots.taken == 0  # given back


# ---------------------------------------------------------------- the view, in process


def _get(path: str, client: Client | None = None, **environ: Any) -> Any:
    auth = sign_request("regional", [SECRET], "GET", path)
    return (client or Client()).get(path, HTTP_AUTHORIZATION=auth, **environ)


@pytest.fixture
def target() -> Target:
    return Target.objects.create(name="regional", secrets=SECRET)


def test_the_feed_is_not_wrapped_in_atomic_requests(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Django refuses to run an async view where ATOMIC_REQUESTS applies; the feed must
    not be in a request's transaction anyway, on whatever alias it reads."""
    for alias in connections:
        monkeypatch.setitem(connections[alias].settings_dict, "ATOMIC_REQUESTS", True)
    Country.objects.create(code="ar")
    answer = _get("/sync/feed/?since=0&wait=1")
    assert answer.status_code == 200, answer.content[:300]
    assert [e["key"] for e in answer.json()["events"]] == [["ar"]]


def test_a_refused_wait_answers_at_once_and_says_when_to_come_back(target: Target) -> None:
    with override_settings(
        CHANGEFEED_SYNC_FEED_WSGI_WAITERS=0, CHANGEFEED_SYNC_FEED_WSGI_RETRY_AFTER=2.5
    ):
        start = time.monotonic()
        answer = _get("/sync/feed/?since=0&wait=10")
        assert time.monotonic() - start < 2.0
    assert answer.status_code == 200
    body = answer.json()
    assert body["events"] == [] and body["last_seq"] == 0 and body["retry_after"] == 2.5
    assert answer["Retry-After"] == "3"  # whole seconds, rounded up
    # Events are never refused: only a wait is.
    Country.objects.create(code="rf")
    with override_settings(CHANGEFEED_SYNC_FEED_WSGI_WAITERS=0):
        answer = _get("/sync/feed/?since=0&wait=10")
    assert [e["key"] for e in answer.json()["events"]] == [["rf"]]
    assert "retry_after" not in answer.json() and not answer.has_header("Retry-After")


def test_more_refused_followers_are_told_to_come_back_later(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n followers told to come back after r seconds ask n / r times a second: r grows
    with n, so that the refused cost a WSGI process REFUSED_PER_SECOND requests."""
    from changefeed_sync.source import views

    monkeypatch.setattr(views, "_REFUSED", views._Refused())
    monkeypatch.setattr(views, "REFUSED_PER_SECOND", 2.0)
    names = ["regional", "second", "third", "fourth", "fifth"]
    for name in names[1:]:
        Target.objects.create(name=name, secrets=SECRET)
    told = []
    with override_settings(CHANGEFEED_SYNC_FEED_WSGI_WAITERS=0):
        for name in [*names, "regional"]:
            path = "/sync/feed/?since=0&wait=10"
            answer = Client().get(
                path, HTTP_AUTHORIZATION=sign_request(name, [SECRET], "GET", path)
            )
            told.append((answer.json()["retry_after"], answer["Retry-After"]))
    # At least FEED_WSGI_RETRY_AFTER (1 s); then the followers refused lately / 2 per s.
    assert told == [
        (1.0, "1"), (1.0, "1"), (1.5, "2"), (2.0, "2"), (2.5, "3"), (2.5, "3"),
    ]  # fmt: skip


def test_a_wsgi_server_of_one_thread_per_process_never_waits(target: Target) -> None:
    """gunicorn's sync workers say wsgi.multithread false: a wait would hold the worker's
    only thread, so none is held, whatever FEED_WSGI_WAITERS says."""
    start = time.monotonic()
    answer = _get("/sync/feed/?since=0&wait=5", SERVER_SOFTWARE="gunicorn/27.0.1")
    assert time.monotonic() - start < 2.0
    assert answer.json()["retry_after"] == 1.0
    # The same server with threads waits.
    start = time.monotonic()
    answer = _get(
        "/sync/feed/?since=0&wait=0.5", SERVER_SOFTWARE="gunicorn/27.0.1",
        **{"wsgi.multithread": True},
    )  # fmt: skip
    assert time.monotonic() - start >= 0.5
    assert "retry_after" not in answer.json()


def test_other_methods_are_refused_as_before(target: Target) -> None:
    answer = Client().post("/sync/feed/")
    assert answer.status_code == 405 and answer["Allow"] == "GET"


def test_a_follower_refused_a_wait_sleeps_before_asking_again(
    target: Target, live_server: Any
) -> None:
    """The follower honours retry_after: without it, a source that answers at once
    would be asked again and again (a busy loop)."""
    from changefeed_sync.target.client import SourceClient
    from changefeed_sync.target.follow import sync

    class Counting(requests.Session):
        asked = 0

        def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            Counting.asked += 1
            return super().request(*args, **kwargs)

    source = DataSource.objects.create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets=SECRET
    )
    stop = threading.Event()
    with override_settings(
        CHANGEFEED_SYNC_FEED_WSGI_WAITERS=0, CHANGEFEED_SYNC_FEED_WSGI_RETRY_AFTER=1.0
    ):
        thread = threading.Thread(
            target=sync,
            kwargs=dict(source=source, follow=True, stop=stop, wait=20.0,
                        client=SourceClient(source, session=Counting())),
        )  # fmt: skip
        thread.start()
        time.sleep(2.5)
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert 2 <= Counting.asked <= 4, Counting.asked  # about one request per second


# ---------------------------------------------------------------- feed_application


class ASGICall:
    """One HTTP request to an ASGI application, driven as a server would drive it."""

    def __init__(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:  # fmt: skip
        path, _, query = path.partition("?")
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": query.encode(),
            "headers": [(b"host", host.encode())]
            + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self._body_read = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def __call__(self, app: Any) -> ASGICall:
        await app(self.scope, self.receive, self.send)
        return self

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def json(self) -> Any:
        return json.loads(self.body)


async def _passed_on(scope: Any, receive: Any, send: Any) -> None:
    """The application feed_application wraps, here: says it was called."""
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"passed on"})


def _signed(path: str) -> dict[str, str]:
    return {"Authorization": sign_request("regional", [SECRET], "GET", path)}


def test_feed_application_answers_the_feed_as_the_view_does(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    app = feed_application(_passed_on)
    Country.objects.create(code="fa")

    async def run() -> list[ASGICall]:
        path = "/sync/feed/?since=0&wait=1"
        return [
            await ASGICall(path, headers=_signed(path))(app),
            await ASGICall("/sync/feed/")(app),  # no credentials
            await ASGICall("/sync/feed/", method="POST")(app),
            await ASGICall("/sync/feed/?since=x", headers=_signed("/sync/feed/?since=x"))(app),
            await ASGICall("/sync/feed/", host="evil.example")(app),  # not in ALLOWED_HOSTS
            await ASGICall("/admin/login/")(app),
            await ASGICall("/sync/snapshot/")(app),
        ]

    with override_settings(ALLOWED_HOSTS=["127.0.0.1"]):
        page, anonymous, post, bad, host, admin, snapshot = asyncio.run(run())
    assert page.status == 200 and [e["key"] for e in page.json()["events"]] == [["fa"]]
    assert page.headers["content-type"] == "application/json"
    assert int(page.headers["content-length"]) == len(page.body)
    assert anonymous.status == 401 and anonymous.headers["www-authenticate"] == "Changefeed"
    assert anonymous.json()["code"] == "authentication_required"
    assert post.status == 405 and post.headers["allow"] == "GET"
    assert bad.status == 400 and bad.json()["code"] == "bad_parameter"
    assert host.status == 400
    # Everything else is the wrapped application's.
    assert admin.status == snapshot.status == 299


def test_feed_application_stops_a_wait_when_the_follower_goes_away(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    app = feed_application(_passed_on)
    path = "/sync/feed/?since=0&wait=20"

    async def run() -> tuple[ASGICall, float]:
        call = ASGICall(path, headers=_signed(path))
        serving = asyncio.ensure_future(call(app))
        while notifier.stats("default")["waiting"] != 1:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        call.gone.set()  # the follower hangs up
        await asyncio.wait_for(serving, 5)
        return call, time.monotonic() - start

    call, seconds = asyncio.run(run())
    assert call.sent == [] and seconds < 1.0  # nobody to answer
    assert notifier.stats("default")["waiting"] == 0


# ---------------------------------------------------------------- real servers


def _listening(port: int, server: Background) -> bool:
    if server.poll() is not None:
        raise AssertionError("the server exited\n" + server.output())
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Source:
    """A source site with ``followers`` Targets, served by ``command`` (a module run with
    ``python -m`` and its arguments, given the port)."""

    def __init__(self, backend: str, workdir: Path, followers: int) -> None:
        self.site = Site("lp", backend, workdir)
        self.site.create_database()
        self.site.migrate()
        self.site.run_python(f"""
            from changefeed_sync.models import Target
            Target.objects.bulk_create(
                [Target(name=f"f{{i}}", secrets={SECRET!r}) for i in range({followers})]
            )
        """)
        self.followers = followers
        self.port = 0
        self.server: Background | None = None

    def serve(self, command: Callable[[int], list[str]], **environ: str) -> None:
        self.port = free_port()
        env = self.site.env()
        env.update(DJANGO_SETTINGS_MODULE="tests.longpoll_settings", **environ)
        self.server = Background(
            [sys.executable, "-m", *command(self.port)], env, self.site.workdir, "server"
        )
        server = self.server
        _until(lambda: _listening(self.port, server), "the server to listen", timeout=30)

    def commit_event(self, code: str) -> float:
        """One new event, from another process; the monotonic time of its commit."""
        stamp: float = self.site.run_python(f"""
            import time
            from tests.testapp.models import Country
            Country.objects.create(code={code!r})
            print(json.dumps(time.monotonic()))
        """)
        return stamp

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.site.close()


@pytest.fixture
def source_factory(tmp_path: Path) -> Iterator[Callable[[str, int], Source]]:
    made: list[Source] = []

    def make(backend: str, followers: int) -> Source:
        require_alias({"sqlite": "default"}.get(backend, backend))
        made.append(Source(backend, tmp_path, followers))
        return made[-1]

    yield make
    for source in made:
        source.close()


async def _stats(port: int) -> dict[str, Any]:
    answer = await loadclient.get(port, "/_longpoll/stats/", timeout=10)
    assert answer.status == 200, answer.body[:300]
    stats: dict[str, Any] = answer.json()
    return stats


async def _admin_page_times(port: int, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        answer = await loadclient.get(port, "/admin/login/", timeout=30)
        assert answer.status == 200, answer.body[:300]
        seconds.append(answer.seconds)
    return seconds


def _uvicorn(app: str) -> Callable[[int], list[str]]:
    return lambda port: [
        "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "1",
    ]  # fmt: skip


FOLLOWERS = 150


@pytest.mark.parametrize(
    ("backend", "app"),
    [
        ("sqlite", "tests.asgi:feed_application"),
        ("postgres", "tests.asgi:feed_application"),
        ("mariadb", "tests.asgi:feed_application"),
        # Django's own handler for every URL: slower answers, still no worker held.
        ("postgres", "tests.asgi:application"),
    ],
    ids=["sqlite-feed_application", "postgres-feed_application", "mariadb-feed_application",
         "postgres-django_handler"],
)  # fmt: skip
def test_an_asgi_source_holds_many_long_polls(
    source_factory: Callable[[str, int], Source], backend: str, app: str
) -> None:
    source = source_factory(backend, FOLLOWERS)
    source.serve(_uvicorn(app))
    port = source.port
    followers = [loadclient.Follower(port, f"f{i}", SECRET, wait=30) for i in range(FOLLOWERS)]

    async def run() -> None:
        polls = [asyncio.ensure_future(f.poll()) for f in followers]
        deadline = time.monotonic() + 60
        while (await _stats(port))["notifier"]["waiting"] < FOLLOWERS:
            assert time.monotonic() < deadline, await _stats(port)
            assert not any(p.done() for p in polls), [p.result() for p in polls if p.done()][:1]
            await asyncio.sleep(0.1)

        # While they all wait: one check per interval, and not one statement more.
        before = await _stats(port)
        await asyncio.sleep(1.0)
        after = await _stats(port)
        checks = after["notifier"]["checks"] - before["notifier"]["checks"]
        assert 5 <= checks <= 1.0 / INTERVAL + 10, (before, after)
        assert after["statements"].get("other", 0) == before["statements"].get("other", 0)
        notifier_statements = after["statements"]["notifier"] - before["statements"]["notifier"]
        assert notifier_statements <= 3 * checks + 3, (before, after)
        if app.endswith("feed_application"):
            # No thread per follower: the process has a few of its own.
            assert after["threads"] < 40, after

        # An ordinary page answers at once.
        seconds = await _admin_page_times(port, 20)
        assert statistics.median(seconds) < 1.0 and max(seconds) < 5.0, seconds

        # One event wakes every follower.
        committed = await asyncio.get_running_loop().run_in_executor(
            None, source.commit_event, "ev"
        )
        answers = await asyncio.wait_for(asyncio.gather(*polls), 30)
        lags = sorted(answer.received - committed for answer in answers)
        assert {answer.status for answer in answers} == {200}
        assert all([e["key"] for e in a.json()["events"]] == [["ev"]] for a in answers)
        assert lags[-1] < 5.0, lags[-10:]
        woken = await _stats(port)
        # A few reads for all of them (the first that read, and any that came later).
        assert woken["cache"]["reads"] <= 3 and woken["cache"]["shared"] >= FOLLOWERS - 3, woken

        # Nobody waits any more: the notifier stops checking.
        await asyncio.sleep(0.2)
        rested = await _stats(port)
        await asyncio.sleep(0.5)
        assert (await _stats(port))["notifier"]["checks"] == rested["notifier"]["checks"]

    asyncio.run(run())


WSGI_FOLLOWERS = 50
RETRY_AFTER = 2.0


def _gunicorn(worker: str) -> Callable[[int], list[str]]:
    # gunicorn turns sync workers with threads into gthread ones: threads for gthread only.
    threads = ["--threads", "4"] if worker == "gthread" else []
    return lambda port: [
        "gunicorn", "tests.wsgi:application", "--bind", f"127.0.0.1:{port}", "--workers", "2",
        "--worker-class", worker, *threads, "--timeout", "60", "--graceful-timeout", "1",
        "--log-level", "warning",
    ]  # fmt: skip


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_a_wsgi_source_stays_up_with_many_followers(
    source_factory: Callable[[str, int], Source], worker: str
) -> None:
    """gunicorn, 2 workers: sync (one thread each) never holds one for a long-poll;
    gthread (4 threads each) lets 2 per process wait, the default bound. The admin
    answers while 50 followers poll, and every follower gets a new event."""
    source = source_factory("postgres", WSGI_FOLLOWERS)
    source.serve(
        _gunicorn(worker),
        # Persistent connections, as a production site has them (followers told to come
        # back then cost the site a few statements each, not a new connection), and a
        # retry_after of 2 s: this machine runs the test's 50 followers, the servers,
        # the database and the other tests.
        CFS_CONN_MAX_AGE="60",
        CFS_FEED_WSGI_RETRY_AFTER=str(RETRY_AFTER),
    )
    port = source.port
    followers = [loadclient.Follower(port, f"f{i}", SECRET, wait=20) for i in range(WSGI_FOLLOWERS)]

    async def run() -> None:
        stop = asyncio.Event()
        await _admin_page_times(port, 4)  # each worker loads the page's templates
        loops = [asyncio.ensure_future(f.follow(stop)) for f in followers]
        # Every follower asked: all but the few that wait were answered.
        deadline = time.monotonic() + 30
        while sum(1 for f in followers if f.answers) < WSGI_FOLLOWERS - 2 * 2:
            assert time.monotonic() < deadline, sum(1 for f in followers if f.answers)
            await asyncio.sleep(0.05)
        # Were every thread held by a follower, the page would wait for a long-poll
        # to end (20 s).
        seconds = await _admin_page_times(port, 10)
        assert statistics.median(seconds) < 2.0 and max(seconds) < 10.0, seconds
        committed = await asyncio.get_running_loop().run_in_executor(
            None, source.commit_event, "ws"
        )
        deadline = time.monotonic() + RETRY_AFTER + 10
        while not all(f.received for f in followers):
            assert time.monotonic() < deadline, [f.name for f in followers if not f.received]
            assert not any(loop.done() for loop in loops), [
                loop.exception() for loop in loops if loop.done()
            ][:1]
            await asyncio.sleep(0.05)
        stop.set()
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        lags = sorted(f.received[0][0] - committed for f in followers)
        answers = [a for f in followers for a in f.answers]
        # Refused followers come back after retry_after (which grows with their number).
        told = max(a.json().get("retry_after", 0) for a in answers)
        assert RETRY_AFTER <= told <= WSGI_FOLLOWERS / 10, told
        assert lags[-1] < told + 5.0, lags
        assert all(a.status == 200 for a in answers), {a.status for a in answers}
        assert any("retry_after" in a.json() for a in answers)  # more followers than slots
        # What each server process did (any worker answers a request: ask until both did).
        seen: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 20
        while len(seen) < 2:
            assert time.monotonic() < deadline, seen
            stats = await _stats(port)
            seen[stats["pid"]] = stats
        most = [stats["wsgi_waiting_most"] for stats in seen.values()]
        notifiers = [stats["notifier"]["threads_started"] for stats in seen.values()]
        if worker == "sync":
            # One thread per process: no long-poll ever waited there.
            assert most == [0, 0] and notifiers == [0, 0], seen
        else:
            # At most the bound (2) per process waited at once, and some did.
            assert max(most) <= 2 and max(most) >= 1, most

    asyncio.run(run())
