"""The target's side of the HTTP protocol: signed requests to a source."""

from __future__ import annotations

import json
import socket
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3

from .. import conf
from ..exceptions import (
    AuthenticationFailed,
    ConfigurationError,
    CursorExpired,
    FilterChanged,
    FramingError,
    ProtocolError,
    SignatureError,
    SourceReset,
    SourceUnavailable,
)
from ..models import SOURCE_ID_MAX, DataSource
from ..serialization import PROTOCOL_VERSION
from ..signing import sign_request
from .framing import check_page


@dataclass
class FetchedPage:
    events: list[dict[str, Any]]
    since: int
    last_seq: int
    more: bool
    pending: int
    #: The identity the source claims (None: an older source sends none).
    source_id: str | None = None
    #: Seconds the source asks to be left alone before the next long-poll: it had no
    #: room to hold one (a WSGI server's bound; 0: it did not ask).
    retry_after: float = 0.0


def source_id_of(body: dict[str, Any], what: str) -> str | None:
    """The ``source_id`` of a feed page, snapshot start or webhook body: None when
    absent (an older source), ProtocolError unless a short non-empty string."""
    claimed = body.get("source_id")
    if claimed is None:
        return None
    if not isinstance(claimed, str) or not 0 < len(claimed) <= SOURCE_ID_MAX:
        raise ProtocolError(
            f"{what}: source_id must be a string of 1 to {SOURCE_ID_MAX} characters"
        )
    return claimed


class SourceClient:
    def __init__(self, source: DataSource, session: requests.Session | None = None) -> None:
        self.source = source
        self.session = session or requests.Session()

    def _url(self, endpoint: str, params: dict[str, Any]) -> str:
        base = self.source.url if self.source.url.endswith("/") else self.source.url + "/"
        return urljoin(base, endpoint) + ("?" + urlencode(params) if params else "")

    def get_json(self, endpoint: str, params: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        return self._json("GET", endpoint, params, None, timeout=timeout)

    def post_json(self, endpoint: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """POST a JSON body, signed with its digest like every request (e.g. ``files/``)."""
        data = json.dumps(body, separators=(",", ":")).encode()
        return self._json("POST", endpoint, {}, data, timeout=timeout)

    def _json(
        self,
        method: str,
        endpoint: str,
        params: dict[str, Any],
        data: bytes | None,
        *,
        timeout: float,
    ) -> dict[str, Any]:
        response = self._send(method, endpoint, params, data, timeout=timeout)
        return self._checked_body(response)

    def _send(
        self,
        method: str,
        endpoint: str,
        params: dict[str, Any],
        data: bytes | None,
        *,
        timeout: float | tuple[float, float],
        stream: bool = False,
    ) -> requests.Response:
        """Send one signed request; return its answer, whatever its status."""
        url = self._url(endpoint, params)
        parts = urlsplit(url)
        path = parts.path + ("?" + parts.query if parts.query else "")
        try:
            authorization = sign_request(
                self.source.client_name, self.source.secret_list(), method, path, data or b""
            )
        except SignatureError as exc:  # no secret
            raise ConfigurationError(f"Data Source {self.source.name}: {exc}") from None
        headers = {"Authorization": authorization}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if "wait=" in path:
            # A long-poll answer on a kept-alive connection was measured 40 ms late
            # (Nagle + delayed ACK with servers that write headers and body apart).
            headers["Connection"] = "close"
        # ``stream`` only when asked: stand-ins for a session (tests) may not take it.
        extra: dict[str, Any] = {"stream": True} if stream else {}
        try:
            return self.session.request(
                method, url, headers=headers, data=data, timeout=timeout, **extra
            )
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                requests.exceptions.MissingSchema) as exc:  # fmt: skip
            raise ConfigurationError(
                f"Data Source {self.source.name}: its URL {self.source.url!r} is unusable ({exc})"
            ) from exc
        except requests.RequestException as exc:
            # Includes a body cut short where its length was announced
            # (Content-Length or chunked): worth retrying.
            raise SourceUnavailable(f"source {self.source.name} at {url}: {exc}") from exc

    def _checked_body(self, response: requests.Response) -> dict[str, Any]:
        """The JSON object of an answer read whole, or the error its status means:
        the same for every endpoint, and for a feed stream that was answered with
        one JSON document (an error, or one page from a source that does not stream)."""
        if response.status_code in (401, 403):
            raise AuthenticationFailed(
                f"source {self.source.name} refused our credentials (HTTP {response.status_code}): "
                f"check that it has a Target named {self.source.client_name!r} with the same secret"
            )
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise SourceUnavailable(
                f"source {self.source.name} answered HTTP {response.status_code}"
            )
        try:
            body = response.json()
        except (ValueError, RecursionError):
            # Garbled, or cut short by a connection closed before the end of a body
            # whose length was not announced: the follower retries either.
            raise ProtocolError(
                f"source {self.source.name} answered HTTP {response.status_code} with no JSON "
                f"(a body of {len(response.content)} bytes that is not JSON, or cut short)"
            ) from None
        if not isinstance(body, dict):
            raise ProtocolError(
                f"source {self.source.name} answered HTTP {response.status_code} with JSON "
                "that is not an object"
            )
        if response.status_code == 410 and body.get("code") == "cursor_expired":
            raise CursorExpired(f"source {self.source.name}: {body.get('error')}")
        if response.status_code == 410 and body.get("code") == "filter_changed":
            raise FilterChanged(f"source {self.source.name}: {body.get('error')}")
        if response.status_code == 409 and body.get("code") == "cursor_ahead":
            raise SourceReset(
                self.source.name,
                f"it answered that checkpoint {self.source.checkpoint} is beyond its last "
                f"position {body.get('position')!r:.30}",
            )
        if response.status_code != 200:
            raise ProtocolError(
                f"source {self.source.name} answered HTTP {response.status_code}: {body.get('error')}"
            )
        self._check_protocol(body)
        return body

    def _check_protocol(self, body: dict[str, Any]) -> None:
        if body.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"source {self.source.name} speaks protocol {body.get('protocol')!r}, "
                f"this site speaks {PROTOCOL_VERSION}"
            )

    def fetch_feed(self, since: int, limit: int, wait: float = 0.0) -> FetchedPage:
        params: dict[str, Any] = {"since": since, "limit": limit}
        if wait:
            params["wait"] = wait
        body = self.get_json("feed/", params, timeout=wait + conf.request_timeout())
        return self._page(body, since)

    def _page(self, body: dict[str, Any], since: int) -> FetchedPage:
        """A feed page checked as nothing of it may be applied otherwise: its types, its
        framing (framing.check_page), and that it starts at ``since``, the cursor asked
        for (or, in a stream, the previous page's end)."""
        events, first, last = body.get("events"), body.get("since"), body.get("last_seq")
        if not isinstance(events, list) or type(first) is not int or type(last) is not int:
            raise ProtocolError(
                f"source {self.source.name}: malformed feed page "
                "(since/last_seq are not integers or events is not a list)"
            )
        if first != since:
            raise ProtocolError(
                f"source {self.source.name}: feed page does not follow cursor {since}"
            )
        try:
            check_page(events, since=since, last_seq=last)
        except FramingError as exc:
            raise FramingError(
                f"source {self.source.name}: feed page refused: {exc}", code=exc.code
            ) from exc
        except ProtocolError as exc:
            raise ProtocolError(f"source {self.source.name}: malformed feed page: {exc}") from exc
        pending = body.get("pending", 0)
        retry_after = body.get("retry_after", 0)
        if type(retry_after) not in (int, float) or not retry_after > 0:
            retry_after = 0.0  # absent, or not a number of seconds: ask again as usual
        return FetchedPage(
            events=events,
            since=since,
            last_seq=last,
            more=body.get("more") is True,
            pending=pending if type(pending) is int else 0,
            source_id=source_id_of(body, f"source {self.source.name}: malformed feed page"),
            # A source cannot park a follower for longer than its backoff's ceiling.
            retry_after=min(float(retry_after), conf.retry_max_delay()),
        )

    def stream_feed(
        self, since: int, limit: int, wait: float
    ) -> Generator[FetchedPage, None, None]:
        """The feed from ``since`` as a stream (``stream=1``): pages as the source
        commits them, for up to ``wait`` seconds (the source's FEED_MAX_WAIT at most).

        Each page is checked as fetch_feed checks one, and must start where the one
        before it ended. A heartbeat (an empty line) is yielded as an empty page at
        the cursor, which applies nothing, so that the caller gets control back at
        least every few seconds (to stop). A source that answers one JSON page (WSGI,
        or a version that does not stream) is a stream of that one page. An error
        line ``cursor_expired`` raises CursorExpired, any other ProtocolError; a
        stream broken off (mid-line, a reset, silence longer than
        CHANGEFEED_SYNC_REQUEST_TIMEOUT) raises SourceUnavailable after the complete
        pages before it. Close the generator to leave the stream early."""
        params: dict[str, Any] = {"since": since, "limit": limit}
        if wait:
            params["wait"] = wait
        params["stream"] = 1
        timeout = conf.request_timeout()
        # Connect, then the answer's head: a source that does not stream holds a
        # long-poll for up to ``wait`` seconds before it answers.
        response = self._send(
            "GET", "feed/", params, None, timeout=(timeout, wait + timeout), stream=True
        )
        try:
            if response.status_code != 200 or not _is_ndjson(response):
                try:
                    response.content  # noqa: B018 - read whole, as an answer that is no stream
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                    raise SourceUnavailable(
                        f"source {self.source.name}: its answer broke off: {exc}"
                    ) from exc
                yield self._page(self._checked_body(response), since)
                return
            # Between lines the source sends a heartbeat every 5 s: silence that
            # lasts REQUEST_TIMEOUT is a connection gone, not a quiet source.
            _set_read_timeout(response, timeout)
            cursor, paged = since, False
            for line in self._lines(response):
                if not line.strip():
                    yield FetchedPage(events=[], since=cursor, last_seq=cursor, more=False,
                                      pending=0)  # fmt: skip
                    continue
                page = self._stream_page(line, cursor)
                cursor, paged = page.last_seq, True
                yield page
            if not paged:
                # Its first page is sent at once: a stream without one is no stream
                # (asking again at once would spin).
                raise ProtocolError(f"source {self.source.name}: its feed stream had no page")
        finally:
            response.close()

    def _stream_page(self, line: bytes, cursor: int) -> FetchedPage:
        """One complete line of a stream that is not a heartbeat: a page from ``cursor``."""
        try:
            body = json.loads(line)
        except (ValueError, RecursionError):
            raise ProtocolError(
                f"source {self.source.name}: a line of {len(line)} bytes in its feed stream "
                "is not JSON"
            ) from None
        if not isinstance(body, dict):
            raise ProtocolError(
                f"source {self.source.name}: a line of its feed stream is not a JSON object"
            )
        if "error" in body:
            if body.get("code") == "cursor_expired":  # pruned while we streamed
                raise CursorExpired(f"source {self.source.name}: {body.get('error')}")
            if body.get("code") == "filter_changed":  # our row filters changed meanwhile
                raise FilterChanged(f"source {self.source.name}: {body.get('error')}")
            raise ProtocolError(
                f"source {self.source.name} ended its feed stream with an error: "
                f"{body.get('error')!r:.300} (code {body.get('code')!r:.40})"
            )
        self._check_protocol(body)
        return self._page(body, cursor)

    def _lines(self, response: requests.Response) -> Iterator[bytes]:
        """The complete lines of a streamed body (without their newline), each as soon
        as its last byte arrived. SourceUnavailable once the body breaks off, or ends
        inside a line: that line is not yielded."""
        pending = bytearray()
        try:
            for chunk in _chunks(response):
                start = 0
                while (end := chunk.find(b"\n", start)) >= 0:
                    pending += chunk[start:end]
                    yield bytes(pending)
                    pending.clear()
                    start = end + 1
                pending += chunk[start:]
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise SourceUnavailable(
                f"source {self.source.name}: its feed stream broke off: {exc}"
            ) from exc
        if pending.strip():
            raise SourceUnavailable(
                f"source {self.source.name}: its feed stream ended inside a line "
                f"({len(pending)} bytes without their end)"
            )


#: Most bytes asked for per read of a stream; a read returns what has arrived.
_READ_SIZE = 65536


def _is_ndjson(response: requests.Response) -> bool:
    kind = response.headers.get("Content-Type", "")
    return kind.split(";")[0].strip().lower() == "application/x-ndjson"


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """A body's bytes as they arrive, not in reads that wait for a full buffer.

    A chunked body (what the source's streams are) yields each chunk as it comes
    (urllib3 reads it chunk by chunk); a body delimited by the connection's end (a
    proxy that took the chunks off) is read with ``read1``, which returns what has
    arrived, where a plain read would wait for ``_READ_SIZE`` bytes.
    """
    raw = response.raw
    if raw.chunked or not hasattr(raw, "read1"):
        yield from response.iter_content(_READ_SIZE)
        return
    while data := raw.read1(_READ_SIZE, decode_content=True):
        yield data


def _set_read_timeout(response: requests.Response, seconds: float) -> None:
    """Make reads of the rest of ``response`` time out after ``seconds`` of silence
    (requests applies one read timeout to the head and the body alike).

    Best effort, through private attributes: the socket the body is read from is that
    of http.client's reader (``Connection: close`` answers, as streams are, leave the
    connection object without one); where it cannot be reached, the head's timeout
    stays (the stream is then given up later, not wrongly)."""
    reader = getattr(getattr(getattr(response.raw, "_fp", None), "fp", None), "raw", None)
    sock = getattr(reader, "_sock", None)
    if sock is None:
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)
