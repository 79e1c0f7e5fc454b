"""The target's side of the HTTP protocol: signed requests to a source."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from . import conf
from .exceptions import (
    AuthenticationFailed,
    ConfigurationError,
    CursorExpired,
    ProtocolError,
    SignatureError,
    SourceReset,
    SourceUnavailable,
)
from .framing import FramingError, check_page
from .models import SOURCE_ID_MAX, DataSource
from .serialization import PROTOCOL_VERSION
from .signing import sign_request


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
        try:
            response = self.session.request(
                method, url, headers=headers, data=data, timeout=timeout
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
        if body.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"source {self.source.name} speaks protocol {body.get('protocol')!r}, "
                f"this site speaks {PROTOCOL_VERSION}"
            )
        return body

    def fetch_feed(self, since: int, limit: int, wait: float = 0.0) -> FetchedPage:
        params: dict[str, Any] = {"since": since, "limit": limit}
        if wait:
            params["wait"] = wait
        body = self.get_json("feed/", params, timeout=wait + conf.request_timeout())
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
