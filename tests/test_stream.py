"""The streamed feed (``stream=1``): one signed request, then the pages as they commit.

A long-poll costs the source a signed request (its Target read, its replay-guard
write, its first read) per page per follower: at 100 writes/s 200 followers kept a
2-core source busy answering them and lagged by seconds. A stream is CouchDB's
``feed=continuous``: the first page at once, every later page as the notifier sees it
committed (read once for all the followers at the same position), an empty line as a
heartbeat, an error line when it cannot go on, the end after ``wait`` seconds.

In this process through ``feed_application`` (an ASGI server's calls), then against
real uvicorn servers on each database with followers reading over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from django.test import Client

from changefeed_sync.management.commands.changefeed_prune import prune
from changefeed_sync.models import Target
from changefeed_sync.signing import sign_request
from changefeed_sync.source import feed, longpoll, notifier
from tests.test_longpoll import (  # noqa: F401 - source_factory is a fixture
    SECRET,
    ASGICall,
    Source,
    _passed_on,
    _stats,
    _uvicorn,
    source_factory,
)
from tests.testapp.models import Country, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(autouse=True)
def _notifiers_stopped() -> Iterator[None]:
    notifier.shutdown()
    yield
    notifier.shutdown()


@pytest.fixture
def target() -> Target:
    return Target.objects.create(name="regional", secrets=SECRET)


def _signed(path: str, name: str = "regional") -> dict[str, str]:
    return {"Authorization": sign_request(name, [SECRET], "GET", path)}


def _lines(call: ASGICall) -> list[bytes]:
    """The complete lines sent so far (the last one may still be coming)."""
    body = call.body
    return body.split(b"\n")[: body.count(b"\n")]


def _pages(call: ASGICall) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(call) if line]


async def _until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _stream(path: str, app: Any) -> tuple[ASGICall, asyncio.Future[ASGICall]]:
    call = ASGICall(path, headers=_signed(path))
    return call, asyncio.ensure_future(call(app))


def _check_chain(pages: list[dict[str, Any]], since: int) -> None:
    """Each page follows the one before; positions rise by one inside a page."""
    for page in pages:
        assert page["since"] == since, pages
        seqs = [event["seq"] for event in page["events"]]
        assert seqs == list(range(since + 1, since + 1 + len(seqs))), pages
        assert page["last_seq"] == (seqs[-1] if seqs else since), pages
        since = page["last_seq"]


# ---------------------------------------------------------------- in process


def test_pages_come_as_they_commit(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    app = feed_application(_passed_on)
    Country.objects.create(code="s0")

    async def run() -> ASGICall:
        call, serving = _stream("/sync/feed/?since=0&wait=20&stream=1", app)
        await _until(lambda: len(_lines(call)) == 1, "the first page")
        for n, code in enumerate(["s1", "s2", "s3"], start=2):
            start = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(
                None, lambda code=code: Country.objects.create(code=code)
            )
            await _until(lambda n=n: len(_pages(call)) == n, f"page {n}")
            assert time.monotonic() - start < 2.0  # an interval (20 ms), on a loaded machine
        assert not serving.done()  # still streaming
        call.gone.set()
        await asyncio.wait_for(serving, 5)
        return call

    call = asyncio.run(run())
    assert call.status == 200
    assert call.headers["content-type"] == "application/x-ndjson"
    assert call.headers["x-accel-buffering"] == "no"
    assert "content-length" not in call.headers
    pages = _pages(call)
    assert [[e["key"] for e in p["events"]] for p in pages] == [
        [["s0"]],
        [["s1"]],
        [["s2"]],
        [["s3"]],
    ]
    _check_chain(pages, 0)
    source_id = feed.sequencer.state("default").source_id
    assert {page["source_id"] for page in pages} == {source_id}
    assert notifier.stats("default")["waiting"] == 0  # the follower went: nothing waits


def _full_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams last their whole ``wait`` (not somewhere in its last quarter)."""
    from changefeed_sync.source import views

    monkeypatch.setattr(views.random, "uniform", lambda low, high: high)


def test_a_stream_ends_in_the_last_quarter_of_wait(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Followers that started together (a restart, a deploy) come back apart."""
    from changefeed_sync.asgi import feed_application
    from changefeed_sync.source import views

    asked: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        asked.append((low, high))
        return 0.8

    monkeypatch.setattr(views.random, "uniform", uniform)
    app = feed_application(_passed_on)

    async def run() -> float:
        start = time.monotonic()
        _, serving = _stream("/sync/feed/?since=0&wait=2&stream=1", app)
        await asyncio.wait_for(serving, 10)
        return time.monotonic() - start

    seconds = asyncio.run(run())
    assert asked == [(0.75, 1.0)]
    assert 1.6 <= seconds < 1.95, seconds  # 0.8 x 2 s


def test_the_first_page_comes_at_once_even_empty_then_heartbeats_then_the_end(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    from changefeed_sync.asgi import feed_application

    monkeypatch.setattr(longpoll, "HEARTBEAT", 0.2)
    _full_length(monkeypatch)
    app = feed_application(_passed_on)

    async def run() -> tuple[ASGICall, float, float]:
        start = time.monotonic()
        call, serving = _stream("/sync/feed/?since=0&wait=1.1&stream=1", app)
        await _until(lambda: len(_lines(call)) == 1, "the first page")
        first = time.monotonic() - start
        await asyncio.wait_for(serving, 5)
        return call, first, time.monotonic() - start

    call, first, total = asyncio.run(run())
    assert first < 1.0
    # It ends in the last quarter of `wait` (streams started together end apart).
    assert 1.1 <= total < 3.0, total
    lines = call.body.split(b"\n")
    assert lines[-1] == b""  # every line is whole
    page = json.loads(lines[0])
    assert page["events"] == [] and page["since"] == page["last_seq"] == 0
    heartbeats = lines[1:-1]
    # 0.2 s after the last line, so up to 5 in 1.1 s (fewer when a busy machine is late).
    assert set(heartbeats) == {b""} and 3 <= len(heartbeats) <= 5, lines
    assert call.sent[-1] == {"type": "http.response.body", "body": b""}  # a clean end


def test_a_stream_catches_up_page_after_page(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    app = feed_application(_passed_on)
    Country.objects.bulk_create([Country(code=f"c{n:02d}") for n in range(25)])  # one event each
    Country.objects.create(code="zz")  # (bulk_create writes its events in one go)
    total = feed.head("default")

    async def run() -> ASGICall:
        call, serving = _stream("/sync/feed/?since=0&limit=10&wait=20&stream=1", app)
        await _until(lambda: sum(len(p["events"]) for p in _pages(call)) == total, "all events")
        call.gone.set()
        await asyncio.wait_for(serving, 5)
        return call

    pages = _pages(asyncio.run(run()))
    assert [len(p["events"]) for p in pages] == [10, 10, total - 20]
    assert [p["more"] for p in pages] == [True, True, False]
    _check_chain(pages, 0)


def test_a_stream_sends_only_its_targets_models(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    Target.objects.filter(pk=target.pk).update(model_labels=["testapp.tag"])
    app = feed_application(_passed_on)

    async def run() -> ASGICall:
        call, serving = _stream("/sync/feed/?since=0&wait=20&stream=1", app)
        await _until(lambda: len(_lines(call)) == 1, "the first page")
        create = asyncio.get_running_loop().run_in_executor
        await create(None, lambda: Country.objects.create(code="no"))
        await create(None, lambda: Tag.objects.create(slug="yes"))
        await _until(lambda: len(_pages(call)) == 2, "the tag's page")
        await asyncio.sleep(0.2)  # nothing more comes
        call.gone.set()
        await asyncio.wait_for(serving, 5)
        return call

    pages = _pages(asyncio.run(run()))
    assert len(pages) == 2 and pages[0]["events"] == []
    assert [(e["model"], e["key"]) for e in pages[1]["events"]] == [("testapp.tag", ["yes"])]
    assert pages[1]["since"] == 0 and pages[1]["last_seq"] == 2  # the country's event passed by


def test_heartbeats_come_while_other_models_keep_waking_the_stream(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wakes for events the follower does not receive are not lines: the heartbeat
    still comes HEARTBEAT seconds after the last line sent."""
    from changefeed_sync.asgi import feed_application

    monkeypatch.setattr(longpoll, "HEARTBEAT", 0.3)
    _full_length(monkeypatch)
    Target.objects.filter(pk=target.pk).update(model_labels=["testapp.tag"])
    app = feed_application(_passed_on)

    def busy_other_model(stop: threading.Event) -> None:
        for n in range(100):
            if stop.is_set():
                return
            Country.objects.create(code=f"{n:02d}")
            time.sleep(0.05)

    async def run() -> ASGICall:
        call, serving = _stream("/sync/feed/?since=0&wait=1.6&stream=1", app)
        stop = threading.Event()
        writer = asyncio.get_running_loop().run_in_executor(None, busy_other_model, stop)
        await asyncio.wait_for(serving, 10)
        stop.set()
        await writer
        return call

    call = asyncio.run(run())
    assert call.status == 200, call.body[:2000]
    lines = call.body.split(b"\n")
    assert json.loads(lines[0])["events"] == []
    # Up to 5, 0.3 s after the last line over the stream's 1.6 s (before the fix: none).
    assert set(lines[1:]) == {b""} and 3 <= len(lines[1:-1]) <= 5, lines
    assert notifier.stats("default")["checks"] > 10  # it was woken, and woken again


def test_a_stream_overtaken_by_pruning_ends_with_an_error_line(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    app = feed_application(_passed_on)

    async def run() -> tuple[ASGICall, float]:
        call, serving = _stream("/sync/feed/?since=0&wait=20&stream=1", app)
        await _until(lambda: len(_lines(call)) == 1, "the first page")

        def prune_past_the_stream() -> None:
            with notifier_paused():
                Country.objects.create(code="p1")
                prune(timedelta(seconds=-60), "default")  # every event, so far
            Country.objects.create(code="p2")  # wakes the stream: its cursor is gone

        start = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, prune_past_the_stream)
        await asyncio.wait_for(serving, 5)
        return call, time.monotonic() - start

    call, seconds = asyncio.run(run())
    lines = _lines(call)
    assert json.loads(lines[0])["events"] == []
    error = json.loads(lines[-1])
    assert error["code"] == "cursor_expired" and "run a full Data Pull" in error["error"]
    assert seconds < 5.0


class notifier_paused:  # noqa: N801 - a context manager read as a phrase
    """Keep the notifier from seeing the head until the block ends (the stream must not
    read between the event and the prune: it would get the event and its cursor would
    move past the pruned ones)."""

    def __enter__(self) -> None:
        _HEAD_LOCK.acquire()

    def __exit__(self, *exc: Any) -> None:
        _HEAD_LOCK.release()


_HEAD_LOCK = threading.Lock()


@pytest.fixture(autouse=True)
def _head_behind_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The notifier's look at the head waits while ``notifier_paused`` holds the lock."""
    original = feed.head

    def head(using: str) -> int:
        with _HEAD_LOCK:
            return original(using)

    monkeypatch.setattr(feed, "head", head)


def test_a_stream_stops_when_the_follower_goes_away(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    app = feed_application(_passed_on)

    async def run() -> float:
        call, serving = _stream("/sync/feed/?since=0&wait=20&stream=1", app)
        await _until(lambda: notifier.stats("default")["waiting"] == 1, "the stream waiting")
        start = time.monotonic()
        call.gone.set()
        await asyncio.wait_for(serving, 5)
        return time.monotonic() - start

    assert asyncio.run(run()) < 1.0
    assert notifier.stats("default")["waiting"] == 0


def test_under_wsgi_a_stream_is_one_page(target: Target) -> None:
    """A WSGI server would give a stream a thread for its whole length: there the
    follower gets the long-poll's page, which is a stream of one line."""
    Country.objects.create(code="w1")
    path = "/sync/feed/?since=0&wait=5&stream=1"
    answer = Client().get(path, HTTP_AUTHORIZATION=_signed(path)["Authorization"])
    assert answer.status_code == 200 and answer["Content-Type"] == "application/json"
    assert b"\n" not in answer.content
    assert [e["key"] for e in answer.json()["events"]] == [["w1"]]


@pytest.mark.parametrize("value", ["yes", "2", "true", "-1", "1 "])
def test_stream_is_0_or_1(target: Target, value: str) -> None:
    from urllib.parse import quote

    path = f"/sync/feed/?since=0&stream={quote(value)}"
    answer = Client().get(path, HTTP_AUTHORIZATION=_signed(path)["Authorization"])
    assert answer.status_code == 400
    assert answer.json()["code"] == "bad_parameter" and "'stream'" in answer.json()["error"]


def test_errors_before_the_stream_are_ordinary_answers(target: Target) -> None:
    from changefeed_sync.asgi import feed_application

    app = feed_application(_passed_on)
    Country.objects.create(code="e1")

    async def run() -> list[ASGICall]:
        ahead = "/sync/feed/?since=99&wait=5&stream=1"
        return [
            await ASGICall("/sync/feed/?since=0&stream=1")(app),  # no credentials
            await ASGICall(ahead, headers=_signed(ahead))(app),
        ]

    anonymous, ahead = asyncio.run(run())
    assert anonymous.status == 401 and anonymous.json()["code"] == "authentication_required"
    assert ahead.status == 409 and ahead.json()["code"] == "cursor_ahead"
    assert ahead.headers["content-type"] == "application/json"


# ---------------------------------------------------------------- real servers


def _read_stream(
    port: int, name: str, since: int, wait: float, out: list[tuple[float, dict[str, Any]]],
    app_ready: threading.Event,
) -> None:  # fmt: skip
    """One follower over HTTP (requests, as the target's client reads it): every page
    line with its arrival time."""
    path = f"/sync/feed/?since={since}&wait={wait:g}&stream=1"
    with requests.get(
        f"http://127.0.0.1:{port}{path}", headers=_signed(path, name), stream=True, timeout=30
    ) as response:
        assert response.status_code == 200, response.text[:300]
        assert response.headers["Content-Type"] == "application/x-ndjson"
        for line in response.iter_lines(chunk_size=None):
            if line:
                out.append((time.monotonic(), json.loads(line)))
                app_ready.set()


FOLLOWERS = 20


@pytest.mark.parametrize(
    ("backend", "app"),
    [
        ("sqlite", "tests.asgi:feed_application"),
        ("postgres", "tests.asgi:feed_application"),
        ("mariadb", "tests.asgi:feed_application"),
        ("postgres", "tests.asgi:application"),  # Django's own ASGI handler streams too
    ],
    ids=["sqlite", "postgres", "mariadb", "postgres-django_handler"],
)
def test_followers_stream_from_a_real_server(
    source_factory: Callable[[str, int], Source],  # noqa: F811 - the fixture imported above
    backend: str,
    app: str,
) -> None:
    source = source_factory(backend, FOLLOWERS)
    source.serve(_uvicorn(app))
    received: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in range(FOLLOWERS)]
    started = [threading.Event() for _ in range(FOLLOWERS)]
    threads = [
        threading.Thread(
            target=_read_stream,
            args=(source.port, f"f{i}", 0, 8.0, received[i], started[i]),
            daemon=True,
        )  # fmt: skip
        for i in range(FOLLOWERS)
    ]
    for thread in threads:
        thread.start()
    for ready in started:
        assert ready.wait(30), "a follower got no first page"
    before = asyncio.run(_stats(source.port))

    committed = {}
    for code in ["r1", "r2", "r3"]:
        committed[code] = source.commit_event(code)
        time.sleep(0.3)
    for thread in threads:
        thread.join(30)  # the streams end after 8 s
        assert not thread.is_alive()
    after = asyncio.run(_stats(source.port))

    for pages in received:
        _check_chain([page for _, page in pages], 0)
        arrived = {e["key"][0]: t for t, page in pages for e in page["events"]}
        assert sorted(arrived) == ["r1", "r2", "r3"]
        for code, at in arrived.items():
            assert at - committed[code] < 2.0, (code, at - committed[code])
    # Each event read about once for all twenty (the first to read, and a straggler).
    reads = after["cache"]["reads"] - before["cache"]["reads"]
    assert reads <= 3 * 3, (before, after)
    # And no request per event: the followers asked once each.
    # (A long-poll would have cost 20 followers x 3 events x a request of ~6 statements.)
    assert after["statements"].get("other", 0) - before["statements"].get("other", 0) <= 60
