"""Many followers from one process: signed feed requests over plain asyncio sockets.

tests/test_longpoll.py and bench/followers.py hold 50 to 200 long-polls open at once
against a real server on loopback. A thread (and a ``requests`` session) per follower
would cost the machine more than the server under test; one event loop with an
HTTP/1.1 GET of a few lines costs next to nothing. One request per connection
(``Connection: close``), as ``SourceClient`` does for long-polls.
"""

from __future__ import annotations

import asyncio
import json
import time
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
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    if not status_line.startswith("HTTP/1."):
        raise ConnectionError(f"not an HTTP answer: {raw[:200]!r}")
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    if answer_headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Answer(int(status_line.split()[1]), answer_headers, body, sent, received)


@dataclass
class Follower:
    """One Target of the source, reading its feed with long-polls (``wait`` seconds)."""

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

    def path(self, wait: float | None = None) -> str:
        wait = self.wait if wait is None else wait
        return f"{self.prefix}feed/?since={self.since}&limit=1000&wait={wait:g}"

    async def poll(self, wait: float | None = None, *, timeout: float | None = None) -> Answer:
        """One feed request; the cursor moves on with its page."""
        path = self.path(wait)
        auth = sign_request(self.name, [self.secret], "GET", path)
        limit = (self.wait if wait is None else wait) + 30.0 if timeout is None else timeout
        answer = await get(self.port, path, {"Authorization": auth}, timeout=limit)
        if self.keep_answers:
            self.answers.append(answer)
        if answer.status == 200:
            page = answer.json()
            for event in page["events"]:
                self.received.append((answer.received, event))
            self.since = page["last_seq"]
        return answer

    async def follow(self, stop: asyncio.Event) -> None:
        """Long-poll until ``stop``, sleeping when the source says to (``retry_after``)."""
        while not stop.is_set():
            answer = await self.poll()
            if answer.status != 200:
                raise AssertionError(f"{self.name}: HTTP {answer.status}: {answer.body[:300]!r}")
            retry_after = answer.json().get("retry_after")
            if retry_after:
                try:
                    await asyncio.wait_for(stop.wait(), retry_after)
                except asyncio.TimeoutError:
                    pass
