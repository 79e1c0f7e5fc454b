"""A webhook receiver for many Targets at once: one real HTTP server on loopback.

Standing in for a target site where a test needs many targets (100 target sites, with
100 databases, do not fit on a test machine) or a target that misbehaves on purpose.
It serves every Target at ``/hook/<target name>/`` and checks each request as a target
site does before applying: the signature with changefeed_sync's own
``signing.verify_request`` (secret, method, path, body digest, age) and the body's
framing (positions increasing, within ``since`` and ``last_seq``). It then records the
delivery and answers 200 ``{"status": "applied"}``, or what the test asked for.

It also records what ordering promises depend on: per target, the spans
``(since, last_seq)`` in arrival order and the most requests it ever had in flight at
once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from changefeed_sync.exceptions import SignatureError
from changefeed_sync.signing import SIGNATURE_HEADER, verify_request


@dataclass
class Received:
    since: int
    last_seq: int
    keys: list[Any]
    at: float


@dataclass
class Receiver:
    secret: str
    url: str = ""
    #: Seconds each answer waits (per target name, else ``delay``); a callable may vary it.
    delay: float | Callable[[str], float] = 0.0
    #: target name -> HTTP status to answer instead of 200 (e.g. 503)
    refuse: dict[str, int] = field(default_factory=dict)
    #: answers wait for this event while it is clear (a target that hangs)
    released: threading.Event = field(default_factory=threading.Event)
    deliveries: dict[str, list[Received]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # requests that failed the checks
    in_flight: dict[str, int] = field(default_factory=dict)
    most_in_flight: dict[str, int] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def webhook_url(self, name: str) -> str:
        return f"{self.url}/hook/{name}/"

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        parts = handler.path.strip("/").split("/")
        name = parts[1] if len(parts) == 2 and parts[0] == "hook" else "?"
        with self._cond:
            self.attempts[name] = self.attempts.get(name, 0) + 1
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            self.most_in_flight[name] = max(
                self.most_in_flight.get(name, 0), self.in_flight[name]
            )
        try:
            status, answer = self._answer(name, handler, body)
        finally:
            with self._cond:
                self.in_flight[name] -= 1
                self._cond.notify_all()
        data = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _answer(
        self, name: str, handler: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        delay = self.delay(name) if callable(self.delay) else self.delay
        if delay:
            time.sleep(delay)
        self.released.wait(60)
        try:
            verify_request(
                handler.headers.get(SIGNATURE_HEADER), "POST", handler.path, body,
                lambda n: [self.secret] if n == name else None, max_age=60,
            )
            batch = json.loads(body)
            since, last = int(batch["since"]), int(batch["last_seq"])
            seqs = [int(e["seq"]) for e in batch["events"]]
            if not (seqs and since < seqs[0] and seqs == sorted(set(seqs)) and seqs[-1] == last):
                raise ValueError(f"bad framing: since {since}, last_seq {last}, {seqs}")
        except (SignatureError, ValueError, KeyError, TypeError) as exc:
            with self._cond:
                self.refused.append(f"{handler.path}: {exc}")
            return 403, {"error": str(exc)}
        if name in self.refuse:
            return self.refuse[name], {"error": "refused by the test"}
        with self._cond:
            self.deliveries.setdefault(name, []).append(
                Received(since, last, [e["key"] for e in batch["events"]], time.monotonic())
            )
            self._cond.notify_all()
        return 200, {"status": "applied"}

    def spans(self, name: str) -> list[tuple[int, int]]:
        with self._cond:
            return [(r.since, r.last_seq) for r in self.deliveries.get(name, [])]

    def last_seq(self, name: str) -> int:
        with self._cond:
            received = self.deliveries.get(name)
            return received[-1].last_seq if received else 0

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._cond.wait(min(remaining, 0.1))

    def wait_for_seq(self, names: list[str], seq: int, timeout: float = 30.0) -> None:
        """Until every one of ``names`` acknowledged a batch reaching ``seq``."""

        def reached() -> bool:
            return all(
                (received := self.deliveries.get(n)) and received[-1].last_seq >= seq
                for n in names
            )

        self.wait(reached, timeout, f"{len(names)} targets to reach position {seq}")


@contextmanager
def running(secret: str) -> Iterator[Receiver]:
    receiver = Receiver(secret)
    receiver.released.set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the source's shared session uses it
        # Headers and body are two writes: with Nagle's algorithm the body waited for the
        # client's delayed ACK (40 ms a request).
        disable_nagle_algorithm = True

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            receiver.handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="test-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.released.set()
        server.shutdown()
        server.server_close()
