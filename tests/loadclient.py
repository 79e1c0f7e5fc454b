"""Many followers from one process: signed feed requests over plain asyncio sockets.

tests/test_longpoll.py and bench/followers.py hold 50 to 200 long-polls open at once
against a real server on loopback. A thread (and a ``requests`` session) per follower
would cost the machine more than the server under test; one event loop with an
HTTP/1.1 GET of a few lines costs next to nothing. One request per connection
(``Connection: close``), as ``SourceClient`` does for long-polls.

``get`` reads a whole answer; ``stream`` reads one line by line as it comes (a streamed
feed, ``stream=1``: newline-delimited pages in a chunked body), and ``Follower(stream=True)``
follows the feed that way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from changefeed_sync.signing import sign_request


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    #: time.monotonic() when the request was sent and when its answer was complete.
    sent: float
    received: float
    #: Streamed answers (``stream``): complete lines read (heartbeats too); whether the
    #: body ended as HTTP says it ends (False: the connection was cut mid-body).
    lines: int = 0
    complete: bool = True

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def seconds(self) -> float:
        return self.received - self.sent


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


async def get(
    port: int, path: str, headers: dict[str, str] | None = None, *, timeout: float = 60.0
) -> Answer:
    """GET ``path`` from 127.0.0.1:``port``; the whole answer (raises on timeout)."""
    sent = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout - (time.monotonic() - sent))
    finally:
        writer.close()
    received = time.monotonic()
    # Let the other answers that came in with this one be stamped before this task goes
    # on parsing (and its follower asking again): one loop serves every follower.
    await asyncio.sleep(0)
    head, _, body = raw.partition(b"\r\n\r\n")
    status, answer_headers = _parse_head(head, raw)
    if answer_headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Answer(status, answer_headers, body, sent, received)


def _parse_head(head: bytes, raw: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names in lower case) of an answer's head (``raw``: what
    came, for the error)."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    if not status_line.startswith("HTTP/1."):
        raise ConnectionError(f"not an HTTP answer: {raw[:200]!r}")
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), answer_headers


class StreamError(Exception):
    """A streamed feed's error line, or a page that does not follow the one before."""


class _Cut(Exception):
    """The connection ended before the body did."""


async def _head(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    port: int,
    path: str,
    headers: dict[str, str] | None,
) -> tuple[int, dict[str, str]]:
    """Send the GET; the answer's status and headers (names in lower case)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise ConnectionError(f"not an HTTP answer: {exc.partial[:200]!r}") from None
    return _parse_head(raw[:-4], raw)


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body's data as it comes: chunk by chunk (chunked transfer encoding), up to
    Content-Length, or up to the end of the connection. Raises _Cut if it ends early."""
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)  # hex, maybe extensions
                if size == 0:
                    # Trailers, if any, up to the empty line.
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return
                data = await reader.readexactly(size)
                if await reader.readexactly(2) != b"\r\n":
                    raise ConnectionError("chunk not followed by CRLF")
                yield data
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                data = await reader.read(min(left, 1 << 16))
                if not data:
                    raise _Cut
                left -= len(data)
                yield data
        else:
            while data := await reader.read(1 << 16):
                yield data
    except asyncio.IncompleteReadError:
        raise _Cut from None


async def stream(
    port: int,
    path: str,
    headers: dict[str, str] | None,
    on_line: Callable[[float, bytes], None],
    *,
    timeout: float = 60.0,
) -> Answer:
    """GET ``path``, its body read as it comes (raises on timeout: the whole answer
    must end within ``timeout``).

    A 200 is read as lines: ``on_line(arrival, line)`` for each complete one, without
    its "\\n" (an empty line is a heartbeat), ``arrival`` the time.monotonic() when the
    data ending it came; an exception from ``on_line`` ends the request. A body that
    ends without a newline after its last line: that line counts when the answer is
    not ``application/x-ndjson`` (an ordinary one-line JSON answer) and the body ended
    as HTTP says it ends; otherwise it is a partial line, ignored (and, cut,
    ``complete`` is False). The Answer's body is the last complete line (b"" if none).
    Other statuses: the whole body, no lines."""
    sent = time.monotonic()
    deadline = sent + timeout
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)

    async def read() -> Answer:
        status, answer_headers = await _head(reader, writer, port, path, headers)
        if status != 200:
            body = bytearray()
            complete = True
            try:
                async for data in _body(reader, answer_headers):
                    body += data
            except _Cut:
                complete = False
            return Answer(status, answer_headers, bytes(body), sent, time.monotonic(),
                          complete=complete)  # fmt: skip
        ndjson = answer_headers.get("content-type", "").startswith("application/x-ndjson")
        pending = b""
        last = b""
        count = 0
        complete = True
        try:
            async for data in _body(reader, answer_headers):
                arrival = time.monotonic()
                pending += data
                if b"\n" not in data:
                    continue
                # As get does: let the other lines that came with this one be stamped
                # before this task goes on parsing (one loop serves every follower).
                await asyncio.sleep(0)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    line = line.removesuffix(b"\r")
                    count += 1
                    last = line or last
                    on_line(arrival, line)
        except _Cut:
            complete = False
        received = time.monotonic()
        if complete and pending and not ndjson:
            count += 1
            last = pending
            on_line(received, pending)
        return Answer(200, answer_headers, last, sent, received, count, complete)

    try:
        return await asyncio.wait_for(read(), deadline - time.monotonic())
    finally:
        writer.close()


@dataclass
class Follower:
    """One Target of the source, reading its feed with long-polls (``wait`` seconds),
    or with streams (``stream``: each a request with ``stream=1``, pages read as they
    come until the source ends it after ``wait`` seconds)."""

    port: int
    name: str
    secret: str
    since: int = 0
    wait: float = 20.0
    prefix: str = "/sync/"
    #: (monotonic time received, event) for every event received.
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    keep_answers: bool = True
    stream: bool = False

    def path(self, wait: float | None = None) -> str:
        wait = self.wait if wait is None else wait
        path = f"{self.prefix}feed/?since={self.since}&limit=1000&wait={wait:g}"
        return path + "&stream=1" if self.stream else path

    async def poll(self, wait: float | None = None, *, timeout: float | None = None) -> Answer:
        """One feed request; the cursor moves on with its page (with ``stream``, with
        each page as it comes; the Answer's body is then the last line)."""
        path = self.path(wait)
        auth = sign_request(self.name, [self.secret], "GET", path)
        limit = (self.wait if wait is None else wait) + 30.0 if timeout is None else timeout
        if self.stream:
            answer = await stream(
                self.port, path, {"Authorization": auth}, self._line, timeout=limit
            )
            if self.keep_answers:
                self.answers.append(answer)
            return answer
        answer = await get(self.port, path, {"Authorization": auth}, timeout=limit)
        if self.keep_answers:
            self.answers.append(answer)
        if answer.status == 200:
            page = answer.json()
            for event in page["events"]:
                self.received.append((answer.received, event))
            self.since = page["last_seq"]
        return answer

    def _line(self, received: float, line: bytes) -> None:
        """One line of a streamed answer: a page, a heartbeat (empty) or an error."""
        if not line:
            return
        page = json.loads(line)
        if "error" in page:
            raise StreamError(f"{self.name}: {page.get('code')}: {page['error']}")
        if page["since"] != self.since:
            raise StreamError(
                f"{self.name}: a page since {page['since']} after last_seq {self.since}"
            )
        for event in page["events"]:
            self.received.append((received, event))
        self.since = page["last_seq"]

    async def follow(self, stop: asyncio.Event) -> None:
        """Long-poll (or stream) until ``stop``, sleeping when the source says to
        (``retry_after``)."""
        while not stop.is_set():
            answer = await self.poll()
            if answer.status != 200:
                raise AssertionError(f"{self.name}: HTTP {answer.status}: {answer.body[:300]!r}")
            retry_after = answer.json().get("retry_after") if answer.body else None
            if retry_after:
                try:
                    await asyncio.wait_for(stop.wait(), retry_after)
                except asyncio.TimeoutError:
                    pass
