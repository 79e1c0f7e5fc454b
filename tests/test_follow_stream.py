"""The follower reading the source's streamed feed (``stream=1``): one request, pages
as they commit, heartbeats between them (the wire format: README, "Streamed feed").

The first half talks to a loopback HTTP server of this module that answers what each
test scripts: lines, pauses, heartbeats, error lines, a body cut mid-line or reset,
one JSON page as a WSGI or older source answers. It checks every request's signature
as a source does. The target is the "default" database of this process.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.db import connections
from django.test import override_settings

from changefeed_sync import conf
from changefeed_sync.exceptions import (
    AuthenticationFailed,
    CursorExpired,
    ProtocolError,
    SignatureError,
    SourceReset,
    SourceUnavailable,
)
from changefeed_sync.models import DataSource
from changefeed_sync.signing import verify_request
from changefeed_sync.target.apply import ApplyStats
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.follow import SyncResult, sync
from tests.conftest import require_alias
from tests.servers import wait_until
from tests.test_follow import country
from tests.test_longpoll import SECRET as LONGPOLL_SECRET
from tests.test_longpoll import (  # noqa: F401 - source_factory is a fixture
    Source,
    _uvicorn,
    source_factory,
)
from tests.testapp.models import Country

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SECRET = "stream-secret-Jd8Qw2Lx5Rv9Tb3Nk7Hc1Zm4"

# --------------------------------------------------------------- a scripted source

#: Steps of a scripted answer besides bytes (sent as they are, one chunk each) and
#: floats (a pause of that many seconds).
CUT = "cut"  # end here: close the connection without ending the body
RESET = "reset"  # end here: close the connection with a TCP reset


@dataclass
class Hold:
    """A step that waits until the test sets ``released`` (at most 10 s)."""

    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


Step = bytes | float | str | Hold


@dataclass
class Scripted:
    """One answer: its status, type and body steps; ``chunked`` (as an ASGI server
    sends a stream) or delimited by the connection's end (a proxy that took the
    chunks off), or with a Content-Length (``length``, one JSON document)."""

    steps: list[Step]
    status: int = 200
    content_type: str = "application/x-ndjson"
    chunked: bool = True
    length: bool = False


def line(since: int, events: list[dict[str, Any]], *, last_seq: int | None = None,
         more: bool = False, **extra: Any) -> bytes:  # fmt: skip
    """One page line of a stream."""
    last = last_seq if last_seq is not None else (events[-1]["seq"] if events else since)
    page = {"protocol": 1, "since": since, "last_seq": last, "more": more, "pending": 0,
            "events": events, **extra}  # fmt: skip
    return json.dumps(page).encode() + b"\n"


def one_page(since: int, events: list[dict[str, Any]], **extra: Any) -> Scripted:
    """What a WSGI (or older) source answers a stream request: one JSON page."""
    return json_answer(line(since, events, **extra).rstrip(b"\n"))


def json_answer(body: bytes, status: int = 200, content_type: str = "application/json") -> Scripted:
    return Scripted([body], status=status, content_type=content_type, chunked=False, length=True)


def error_line(code: str, error: str = "pruned while you streamed") -> bytes:
    return json.dumps({"protocol": 1, "error": error, "code": code}).encode() + b"\n"


@dataclass
class Asked:
    query: dict[str, str]
    signed: str  # "" when the signature verified, else why not
    at: float

    @property
    def since(self) -> int:
        return int(self.query["since"])

    @property
    def stream(self) -> bool:
        return self.query.get("stream") == "1"


class StreamSource:
    """A source on 127.0.0.1: stream requests get the next of ``streams`` (then an idle
    stream: an empty page at the cursor asked for, heartbeats every ``HEARTBEAT`` s
    for ``IDLE`` s), other feed requests the next of ``pages`` (then an empty page)."""

    HEARTBEAT = 0.1
    IDLE = 3.0

    def __init__(self, streams: list[Scripted] = (), pages: list[Scripted] = ()) -> None:  # type: ignore[assignment]
        self.streams = list(streams)
        self.pages = list(pages)
        self.asked: list[Asked] = []
        #: Answers whose connection the follower closed while they were still sent.
        self.left = 0
        self.closing = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                owner.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/sync/"

    def __enter__(self) -> StreamSource:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def streamed(self) -> list[Asked]:
        with self._lock:
            return [a for a in self.asked if a.stream]

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        try:
            verify_request(
                handler.headers.get("Authorization"), "GET", handler.path, b"",
                lambda name: [SECRET] if name == "regional" else None,
            )  # fmt: skip
            signed = ""
        except SignatureError as exc:
            signed = exc.reason
        asked = Asked(query, signed, time.monotonic())
        with self._lock:
            self.asked.append(asked)
            queue = self.streams if asked.stream else self.pages
            answer = queue.pop(0) if queue else None
        if answer is None:
            answer = self.idle(asked.since) if asked.stream else one_page(asked.since, [])
        try:
            self.send(handler, answer)
        except OSError:  # the follower went away
            with self._lock:
                self.left += 1
        handler.close_connection = True

    def idle(self, since: int) -> Scripted:
        beats = int(self.IDLE / self.HEARTBEAT)
        return Scripted([line(since, []), *[self.HEARTBEAT, b"\n"] * beats])

    def send(self, handler: BaseHTTPRequestHandler, answer: Scripted) -> None:
        head = [f"HTTP/1.1 {answer.status} X", f"Content-Type: {answer.content_type}",
                "Connection: close"]  # fmt: skip
        if answer.chunked:
            head.append("Transfer-Encoding: chunked")
        elif answer.length:
            size = sum(len(s) for s in answer.steps if isinstance(s, bytes))
            head.append(f"Content-Length: {size}")
        out = handler.wfile
        out.write(("\r\n".join(head) + "\r\n\r\n").encode())
        for step in answer.steps:
            if self.closing.is_set():
                return
            if isinstance(step, Hold):
                step.released.wait(10)
            elif isinstance(step, float):
                time.sleep(step)
            elif step == CUT:
                return  # no last chunk: the body ends unfinished
            elif step == RESET:
                handler.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                handler.connection.close()
                return
            elif isinstance(step, bytes) and step:
                out.write(b"%x\r\n%s\r\n" % (len(step), step) if answer.chunked else step)
        if answer.chunked:
            out.write(b"0\r\n\r\n")


def _source(url: str) -> DataSource:
    return DataSource.objects.create(name="hq", url=url, client_name="regional", secrets=SECRET)


# --------------------------------------------------------------- a follower in a thread


class Follower:
    """``sync(follow=True)`` in a thread, recording what on_page saw."""

    def __init__(
        self, ds: DataSource, *, wait: float = 20.0, using: str = "default",
        client: SourceClient | None = None,
    ) -> None:  # fmt: skip
        self.stop = threading.Event()
        self.pages: list[tuple[int, int]] = []  # (events, checkpoint) per on_page
        self.errors: list[BaseException] = []
        self.result: SyncResult | None = None

        def on_page(stats: ApplyStats, source: DataSource) -> None:
            self.pages.append((stats.events, source.checkpoint))

        def run() -> None:
            try:
                self.result = sync(
                    ds, using=using, follow=True, stop=self.stop, wait=wait, on_page=on_page,
                    client=client,
                )  # fmt: skip
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                self.errors.append(exc)
            finally:
                connections.close_all()

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def finish(self, timeout: float = 10.0) -> float:
        """Stop it; the seconds it took to end."""
        started = time.monotonic()
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the follower did not stop"
        return time.monotonic() - started

    def ended(self, timeout: float = 10.0) -> None:
        """Wait for it to end by itself (a fatal error)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.finish()
            pytest.fail("the follower did not end")


def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return wait_until(predicate, timeout=timeout, interval=0.01, what=what)


def exists(code: str) -> bool:
    return Country.objects.filter(code=code).exists()


@pytest.fixture
def follower() -> Iterator[Callable[..., Follower]]:
    made: list[Follower] = []

    def make(ds: DataSource, **kwargs: Any) -> Follower:
        made.append(Follower(ds, **kwargs))
        return made[-1]

    yield make
    for one in made:
        if one.thread.is_alive():
            one.finish()


FAST_RETRIES = {"CHANGEFEED_SYNC_RETRY_MIN_DELAY": 0.01, "CHANGEFEED_SYNC_RETRY_MAX_DELAY": 0.05}


# --------------------------------------------------------------- the client


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "connection-delimited"])
def test_a_line_is_read_as_soon_as_it_arrives(chunked: bool) -> None:
    """A short line, then nothing for a while: the line is there at once, not once a
    read buffer (requests' 512 bytes, urllib3's read size) filled up."""
    hold = Hold()
    with StreamSource([Scripted([line(0, [country(1, "fr")]), hold], chunked=chunked)]) as src:
        pages = SourceClient(_source(src.url)).stream_feed(0, 100, 20.0)
        try:
            started = time.monotonic()
            first = next(pages)
            seconds = time.monotonic() - started
            assert not hold.released.is_set()
            assert seconds < 2.0, seconds  # the hold lasts 10 s
            assert (first.since, first.last_seq, len(first.events)) == (0, 1, 1)
            hold.release()
            assert list(pages) == []  # ends cleanly after the hold
        finally:
            hold.release()
            pages.close()
    [asked] = src.asked
    assert asked.signed == ""  # signed as every request
    assert asked.query == {"since": "0", "limit": "100", "wait": "20.0", "stream": "1"}


def test_pages_follow_each_other_and_heartbeats_come_back_as_empty_pages() -> None:
    steps: list[Step] = [
        line(0, [country(1, "fr")]), b"\n", line(1, [country(3, "de"), country(4, "it")]),
        b"\n", b"\n", line(4, [country(9, "es")], more=True), line(9, [country(10, "pt")]),
    ]  # fmt: skip
    with StreamSource([Scripted(steps)]) as src:
        pages = list(SourceClient(_source(src.url)).stream_feed(0, 100, 20.0))
    spans = [(p.since, p.last_seq, len(p.events), p.more) for p in pages]
    assert spans == [
        (0, 1, 1, False), (1, 1, 0, False), (1, 4, 2, False), (4, 4, 0, False),
        (4, 4, 0, False), (4, 9, 1, True), (9, 10, 1, False),
    ]  # fmt: skip


def test_silence_longer_than_the_request_timeout_is_a_broken_stream() -> None:
    """Heartbeats come every 5 s: a stream silent for REQUEST_TIMEOUT is gone, however
    long the wait asked for."""
    hold = Hold()
    with StreamSource([Scripted([line(0, []), hold])]) as src, \
            override_settings(CHANGEFEED_SYNC_REQUEST_TIMEOUT=0.5):  # fmt: skip
        pages = SourceClient(_source(src.url)).stream_feed(0, 100, 20.0)
        try:
            assert next(pages).last_seq == 0
            started = time.monotonic()
            with pytest.raises(SourceUnavailable, match="broke off"):
                next(pages)
            assert time.monotonic() - started < 3.0
        finally:
            hold.release()
            pages.close()


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (json_answer(b'{"protocol": 1, "error": "no"}', 401), AuthenticationFailed, "credentials"),
        (json_answer(b'{"protocol": 1, "error": "no"}', 403), AuthenticationFailed, "credentials"),
        (json_answer(b"<h1>down</h1>", 503, "text/html"), SourceUnavailable, "HTTP 503"),
        (json_answer(b'{"protocol": 1, "error": "gone", "code": "cursor_expired"}', 410),
         CursorExpired, "gone"),
        (json_answer(b'{"protocol": 1, "error": "ahead", "code": "cursor_ahead",'
                     b' "position": 3}', 409), SourceReset, "beyond its last position 3"),
        (json_answer(b'{"protocol": 1, "error": "bad", "code": "bad_parameter"}', 400),
         ProtocolError, "HTTP 400: bad"),
        (json_answer(b"<html>portal</html>", 200, "text/html"), ProtocolError, "no JSON"),
        (json_answer(b'{"protocol": 2}'), ProtocolError, "protocol 2"),
        # In a stream: a line that is no page, an error line, a stream without a page.
        (Scripted([b"<html>\n"]), ProtocolError, "not JSON"),
        (Scripted([b"[1, 2]\n"]), ProtocolError, "not a JSON object"),
        (Scripted([b'{"protocol": 2, "since": 0, "last_seq": 0, "events": []}\n']),
         ProtocolError, "protocol 2"),
        (Scripted([error_line("cursor_expired")]), CursorExpired, "pruned while you streamed"),
        (Scripted([error_line("stream_failed", "the source failed")]), ProtocolError,
         "the source failed"),
        (Scripted([b"\n"]), ProtocolError, "had no page"),
        (Scripted([line(3, [])]), ProtocolError, "does not follow cursor 0"),
        (Scripted([line(0, [country(1, "fr")], last_seq=2)]), ProtocolError, "last_seq 2"),
    ],
    ids=["401", "403", "503", "410-cursor_expired", "409-cursor_ahead", "400", "html-200",
         "protocol-2", "line-not-json", "line-not-object", "line-protocol-2",
         "line-cursor_expired", "line-other-error", "no-page", "first-since", "framing"],
)  # fmt: skip
def test_what_a_stream_request_may_be_answered(
    answer: Scripted, error: type[Exception], match: str
) -> None:
    """Answers before the stream starts are handled as every request's are; a stream's
    lines are checked as pages fetched alone are."""
    with StreamSource([answer]) as src:
        with pytest.raises(error, match=match):
            list(SourceClient(_source(src.url)).stream_feed(0, 100, 20.0))


def test_one_json_page_is_a_stream_of_one_page() -> None:
    """A WSGI source (or one that does not stream) answers one page, maybe with
    retry_after."""
    answers = [one_page(0, [country(1, "fr")], source_id="src-1"),
               one_page(1, [], retry_after=1.5)]  # fmt: skip
    with StreamSource(answers) as src:
        client = SourceClient(_source(src.url))
        [page] = list(client.stream_feed(0, 100, 20.0))
        assert (page.since, page.last_seq, page.source_id, page.retry_after) == (0, 1, "src-1", 0)
        [page] = list(client.stream_feed(1, 100, 20.0))
        assert (page.since, page.last_seq, page.events, page.retry_after) == (1, 1, [], 1.5)


@pytest.mark.parametrize("end", [[CUT], [0.05, RESET]], ids=["cut", "reset"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "connection-delimited"])
def test_a_stream_broken_off_yields_its_complete_lines_then_fails(
    chunked: bool, end: list[Step]
) -> None:
    whole = line(1, [country(2, "de")])
    steps: list[Step] = [line(0, [country(1, "fr")]), whole[: len(whole) // 2], *end]
    with StreamSource([Scripted(steps, chunked=chunked)]) as src:
        got = []
        with pytest.raises(SourceUnavailable):
            for page in SourceClient(_source(src.url)).stream_feed(0, 100, 20.0):
                got.append((page.since, page.last_seq))
    assert got == [(0, 1)]


# --------------------------------------------------------------- the follower


def test_pages_are_applied_as_they_arrive(follower: Callable[..., Follower]) -> None:
    first, second = Hold(), Hold()
    steps: list[Step] = [
        line(0, [country(1, "fr", "France")]), first,
        line(1, [country(2, "de")]), second,
        line(2, [country(5, "it"), country(6, "es")]),
    ]  # fmt: skip
    with StreamSource([Scripted(steps)]) as src:
        ds = _source(src.url)
        running = follower(ds)
        until(lambda: exists("fr"), "the first page")
        # Applied while its stream is still open, with its checkpoint.
        assert not exists("de") and DataSource.objects.get(pk=ds.pk).checkpoint == 1
        first.release()
        until(lambda: exists("de"), "the second page")
        assert not exists("it")
        second.release()
        until(lambda: exists("es"), "the third page")
        until(lambda: len(src.streamed()) >= 2, "the next stream")
        running.finish()
        asked = src.asked
    assert running.errors == []
    # Caught up by one plain page, then one stream for the three pages, then the next
    # from where that one ended.
    assert [(a.stream, a.since) for a in asked[:3]] == [(False, 0), (True, 0), (True, 6)]
    assert all(a.signed == "" for a in asked)
    assert running.pages == [(1, 1), (1, 2), (2, 6)]
    result = running.result
    assert result is not None
    assert (result.pages, result.stats.events, result.checkpoint) == (3, 4, 6)
    assert Country.objects.get(code="fr").name == "France"


def test_a_follower_stops_within_a_heartbeat(follower: Callable[..., Follower]) -> None:
    """Heartbeats give the follower control between pages: stop does not wait for the
    end of the stream (20 s here)."""
    with StreamSource() as src:
        running = follower(_source(src.url), wait=20.0)
        until(lambda: src.streamed(), "a stream")
        time.sleep(0.3)
        seconds = running.finish()
        assert seconds < 2.0, seconds  # a heartbeat is 0.1 s here, 5 s from a real source
        until(lambda: src.left, "the source to notice the follower left")
    assert running.errors == []


def test_a_cursor_expired_line_ends_the_follower(follower: Callable[..., Follower]) -> None:
    steps: list[Step] = [line(0, [country(1, "fr")]), b"\n", error_line("cursor_expired")]
    with StreamSource([Scripted(steps)]) as src:
        ds = _source(src.url)
        running = follower(ds)
        running.ended()
    assert len(running.errors) == 1 and isinstance(running.errors[0], CursorExpired)
    assert exists("fr")  # the page before it stands
    ds.refresh_from_db()
    assert ds.checkpoint == 1 and "pruned while you streamed" in ds.last_error


@pytest.mark.parametrize(
    ("chunked", "end"),
    [(True, [CUT]), (False, [CUT]), (True, [0.05, RESET])],
    ids=["chunked-cut", "connection-delimited-cut", "reset"],
)
def test_a_stream_cut_mid_line_keeps_its_complete_pages_and_is_retried(
    follower: Callable[..., Follower], chunked: bool, end: list[Step],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    whole = line(2, [country(3, "it")])
    broken: list[Step] = [line(0, [country(1, "fr")]), line(1, [country(2, "de")]),
                          whole[:-10], *end]  # fmt: skip
    with StreamSource([Scripted(broken, chunked=chunked), Scripted([whole])]) as src, \
            override_settings(**FAST_RETRIES):  # fmt: skip
        ds = _source(src.url)
        running = follower(ds)
        until(lambda: exists("it"), "the page of the retry")
        running.finish()
        streamed = src.streamed()
    assert running.errors == []
    assert [a.since for a in streamed[:2]] == [0, 2]  # again from the last complete line
    assert running.pages == [(1, 1), (1, 2), (1, 3)]
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 1 and "feed stream" in retried[0], retried
    ds.refresh_from_db()
    assert ds.checkpoint == 3 and ds.last_error == ""


def test_a_later_line_that_does_not_follow_is_refused_with_nothing_of_it_applied(
    follower: Callable[..., Follower],
) -> None:
    # The second page claims to start at 5: events 2-5 would be skipped.
    steps: list[Step] = [line(0, [country(1, "fr")]), line(5, [country(6, "de")])]
    retry = Hold()
    with StreamSource([Scripted(steps), Scripted([retry, line(1, [])])]) as src, \
            override_settings(**FAST_RETRIES):  # fmt: skip
        ds = _source(src.url)
        running = follower(ds)
        until(lambda: len(src.streamed()) >= 2, "the retry")
        ds.refresh_from_db()
        assert "does not follow cursor 1" in ds.last_error
        retry.release()
        running.finish()
        streamed = src.streamed()
    assert running.errors == []
    assert exists("fr") and not exists("de")
    assert ds.checkpoint == 1
    assert streamed[1].since == 1


def test_one_json_page_and_retry_after_from_a_source_that_does_not_stream(
    follower: Callable[..., Follower],
) -> None:
    answers = [one_page(0, [country(1, "fr")]), one_page(1, [], retry_after=0.6)]
    with StreamSource(answers) as src:
        running = follower(_source(src.url))
        until(lambda: len(src.streamed()) >= 3, "three stream requests")
        running.finish()
        streamed = src.streamed()
    assert running.errors == [] and exists("fr")
    assert [a.since for a in streamed[:3]] == [0, 1, 1]
    # After a page: again at once. After retry_after: not before it.
    assert streamed[1].at - streamed[0].at < 0.5
    assert streamed[2].at - streamed[1].at >= 0.55


def test_a_checkpoint_moved_by_someone_else_leaves_the_stream(
    follower: Callable[..., Follower],
) -> None:
    """A webhook (or a pull) applied up to 7 while the stream was at 1: the stream's next
    page is not applied, and the follower starts again from 7."""
    moved = Hold()
    steps: list[Step] = [line(0, [country(1, "fr")]), moved, line(1, [country(2, "de")]),
                         line(2, [country(3, "it")])]  # fmt: skip
    with StreamSource([Scripted(steps)]) as src:
        ds = _source(src.url)
        running = follower(ds)
        until(lambda: exists("fr"), "the first page")
        DataSource.objects.filter(pk=ds.pk).update(checkpoint=7)
        moved.release()
        until(lambda: len(src.streamed()) >= 2, "the next stream")
        running.finish()
        streamed = src.streamed()
    assert running.errors == []
    assert not exists("de") and not exists("it")
    assert streamed[1].since == 7
    ds.refresh_from_db()
    assert ds.checkpoint == 7 and ds.last_error == ""


def test_every_line_is_checked_against_the_source_identity(
    follower: Callable[..., Follower],
) -> None:
    steps: list[Step] = [line(0, [country(1, "fr")], source_id="the-source"),
                         line(1, [country(2, "de")], source_id="another")]  # fmt: skip
    with StreamSource([Scripted(steps)]) as src:
        ds = _source(src.url)
        running = follower(ds)
        running.ended()
    assert len(running.errors) == 1 and isinstance(running.errors[0], SourceReset)
    assert exists("fr") and not exists("de")
    ds.refresh_from_db()
    assert (ds.checkpoint, ds.source_id) == (1, "the-source")


def test_without_follow_stream_the_follower_long_polls_pages(
    follower: Callable[..., Follower],
) -> None:
    """CHANGEFEED_SYNC_FOLLOW_STREAM = False, for a proxy that holds a response back
    until it ends."""
    answers = [one_page(0, [country(1, "fr")])]
    with StreamSource(pages=answers) as src, \
            override_settings(CHANGEFEED_SYNC_FOLLOW_STREAM=False):  # fmt: skip
        assert conf.follow_stream() is False
        running = follower(_source(src.url), wait=0.2)
        until(lambda: len(src.asked) >= 3, "three requests")
        running.finish()
        asked = src.asked
    assert running.errors == [] and exists("fr")
    assert not any(a.stream for a in asked)
    # The first page at once, then long-polls.
    assert [a.query.get("wait") for a in asked[:3]] == [None, "0.2", "0.2"]


def test_catching_up_without_follow_reads_plain_pages() -> None:
    answers = [one_page(0, [country(1, "fr")], more=True), one_page(1, [country(2, "de")])]
    with StreamSource(pages=answers) as src:
        result = sync(_source(src.url), using="default")
        asked = src.asked
    assert (result.pages, result.checkpoint) == (2, 2)
    assert [(a.stream, a.since) for a in asked] == [(False, 0), (False, 1)]


# --------------------------------------------------------------- a real source


class Recording(requests.Session):
    """The follower's session: when it asked, and for what."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[float, dict[str, str]]] = []

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        self.asked.append((time.monotonic(), query))
        return super().request(method, url, *args, **kwargs)

    def streams(self) -> list[tuple[float, dict[str, str]]]:
        return [(at, q) for at, q in self.asked if q.get("stream") == "1"]


@pytest.mark.parametrize(
    ("backend", "alias"), [("sqlite", "default"), ("postgres", "postgres")],
    ids=["sqlite", "postgres"],
)  # fmt: skip
def test_a_follower_streams_from_a_real_source(
    source_factory: Callable[[str, int], Source],  # noqa: F811 - the fixture imported above
    follower: Callable[..., Follower],
    backend: str,
    alias: str,
) -> None:
    """A source site served by uvicorn (feed_application) on its own database, this
    process's database as the target: caught up by pages, then one stream carries the
    events as they commit, the next stream is asked for as one ends, stop ends it
    within a heartbeat."""
    require_alias(alias)
    source = source_factory(backend, 1)  # Target "f0"
    for code in ["c1", "c2", "c3"]:
        source.commit_event(code)
    source.serve(_uvicorn("tests.asgi:feed_application"))
    ds = DataSource.objects.using(alias).create(
        name="hq", url=f"http://127.0.0.1:{source.port}/sync/", client_name="f0",
        secrets=LONGPOLL_SECRET,
    )  # fmt: skip
    session = Recording()
    wait = 3.0
    running = follower(ds, wait=wait, using=alias, client=SourceClient(ds, session=session))
    on_target = Country.objects.using(alias)
    until(lambda: on_target.filter(code="c3").exists(), "the catch-up", timeout=30)
    until(lambda: session.streams(), "a stream")

    lags = []
    for code in ["s1", "s2", "s3"]:
        committed = source.commit_event(code)
        until(lambda c=code: on_target.filter(code=c).exists(), f"{code} on the target")
        lags.append(time.monotonic() - committed)
        time.sleep(0.2)
    # Long enough for the stream to end (after ``wait``) and the next to be asked for.
    until(lambda: len(session.streams()) >= 3, "three streams", timeout=4 * wait + 10)
    seconds = running.finish()
    assert running.errors == []
    assert seconds < 5.0 + 2.0, seconds  # a heartbeat (5 s) and some slack

    assert max(lags) < 2.0, lags
    streams = session.streams()
    plain = [q for _, q in session.asked if q.get("stream") != "1"]
    assert len(plain) >= 1 and all("wait" not in q for q in plain)  # catching up
    # One stream carried the three events: each held open for 3/4 of ``wait`` to
    # ``wait`` (the source spreads the ends), the next asked for as soon as it ended
    # (not one request per page, as long-polls are).
    gaps = [b - a for (a, _), (b, _) in zip(streams, streams[1:])]
    assert all(0.75 * wait - 0.3 < gap < wait + 2.0 for gap in gaps), gaps
    assert len(streams) <= 2 + (time.monotonic() - streams[0][0]) / (0.75 * wait)
    ds.refresh_from_db(using=alias)
    assert int(streams[-1][1]["since"]) == ds.checkpoint  # each from where the last ended

    assert running.pages and sum(events for events, _ in running.pages) == 6
    codes = sorted(c for (c,) in source.site.query("SELECT code FROM testapp_country"))
    assert sorted(on_target.values_list("code", flat=True)) == codes
    assert ds.last_error == "" and ds.checkpoint == running.pages[-1][1]
