"""HTTP endpoints: thin wrappers over feed.py; authentication from signing.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from django.core.handlers.wsgi import WSGIRequest
from django.db import transaction
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from django.utils import timezone
from django.utils.log import log_response
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from .. import conf
from ..exceptions import (
    BadFileToken,
    CursorAhead,
    CursorExpired,
    FileOutsideFilter,
    FilterChanged,
    RowFiltersInvalid,
    SignatureError,
)
from ..http import bool_param, error_response, float_param, int_param, plausible_name, shown
from ..models import Target
from ..selection import Selection
from ..serialization import PROTOCOL_VERSION
from . import feed, file_serving, longpoll, routes, sequencer, snapshot_request
from .sqlite_waits import prompt_lock_waits, retry_transaction

logger = logging.getLogger("changefeed_sync.views")


def verify(request: HttpRequest, using: str) -> tuple[str, str, Target]:
    """(target name, nonce, the Target) of a signed feed or snapshot request, or
    SignatureError."""
    from ..signing import verify_request

    found: list[Target] = []

    def secrets_for(name: str) -> list[str] | None:
        if not plausible_name(name):
            return None
        target = Target.objects.using(using).filter(name=name, active=True).first()
        if target is None:
            return None
        found.append(target)  # kept: the feed needs its models too (one read per request)
        secrets: list[str] = target.secret_list()
        return secrets

    name, nonce = verify_request(
        request.headers.get("Authorization"),
        request.method or "GET",
        request.get_full_path(),
        request.body,
        secrets_for,
    )
    return name, nonce, found[-1]


def record_request(name: str, nonce: str, using: str, seq: int | None = None) -> None:
    """Replay guard and "last seen", in one short write transaction."""
    from ..signing import remember_nonce

    def write() -> None:
        with transaction.atomic(using=using):
            remember_nonce(nonce, using)
            seen: dict[str, Any] = {"last_seen_at": timezone.now()}
            if seq is not None:
                seen["last_seen_seq"] = seq
            Target.objects.using(using).filter(name=name).update(**seen)

    # Every request writes: on a busy SQLite source, wait for the lock promptly.
    retry_transaction(using, write)


def _refused(request: HttpRequest, exc: SignatureError) -> JsonResponse:
    logger.warning("%.200s request refused: %.500s", request.path, exc.reason)
    if exc.missing:
        return error_response(401, "authentication required", "authentication_required")
    return error_response(403, "authentication failed", "authentication_failed")


def _authenticated(request: HttpRequest, using: str) -> Target | JsonResponse:
    try:
        name, nonce, target = verify(request, using)
        record_request(name, nonce, using)
    except SignatureError as exc:
        return _refused(request, exc)
    return target


def _selection(target: Target) -> Selection | JsonResponse:
    """What the Target reads; a 409 when its saved row filters are not valid (E011):
    it gets nothing rather than rows outside what was meant."""
    try:
        return Selection.of(target)
    except RowFiltersInvalid as exc:
        logger.warning("%.200s", exc)
        return error_response(
            409,
            f"{exc}: correct them (system check changefeed_sync.E011 lists the same)",
            "row_filters_invalid",
        )


def _routed(target: Target) -> feed.Routed | JsonResponse | None:
    """A filtered Target's part of the feed (None: not filtered); a 409 for filters
    it cannot read (routes.reading; _selection refuses them first)."""
    found = routes.reading(target)
    if isinstance(found, str):
        return error_response(409, found, "row_filters_invalid")
    return found


def _expired(exc: CursorExpired) -> JsonResponse:
    code = "filter_changed" if isinstance(exc, FilterChanged) else "cursor_expired"
    return error_response(410, str(exc), code)


def _not_offered(label: str) -> JsonResponse:
    """The one answer for a model a Target may not read, registered here or not:
    nothing tells the two apart."""
    return error_response(
        404, f"model {shown(label)} is not offered to this target", "unknown_model"
    )


@transaction.non_atomic_requests
@require_GET
def snapshot_view(request: HttpRequest) -> JsonResponse:
    """Without ``model``: the snapshot's feed position and model order; with it: one
    page or its digests (snapshot_request.py), of the rows the Target reads."""
    using = conf.feed_database()
    target = _authenticated(request, using)
    if isinstance(target, JsonResponse):
        return target
    selection = _selection(target)
    if isinstance(selection, JsonResponse):
        return selection
    if not request.GET.get("model"):
        routes.stamp(target, using)  # a pull's position is then past a change of filters
    try:
        body = snapshot_request.answer(request, selection, target.name, using)
    except LookupError:
        return _not_offered(request.GET.get("model") or "")
    except (ValueError, TypeError) as exc:
        return error_response(400, f"bad snapshot request: {exc}", "bad_parameter")
    return JsonResponse(body)


#: Most files one ``POST files/`` may ask about.
MAX_DESCRIBE = 1000


@csrf_exempt
@transaction.non_atomic_requests
@require_http_methods(["GET", "POST"])
def file_view(request: HttpRequest) -> FileResponse | JsonResponse:
    """GET: the bytes of one file a token names (from a snapshot page or a POST here).
    POST: describe the files an increment references (file_serving.describe_current)."""
    using = conf.feed_database()
    try:
        name, nonce, target = verify(request, using)
        record_request(name, nonce, using)
    except SignatureError as exc:
        return _refused(request, exc)
    selection = _selection(target)
    if isinstance(selection, JsonResponse):
        return selection
    if request.method == "POST":
        return _describe_files(request, target.name, selection, using)
    try:
        handle, size = file_serving.open_listed(
            request.GET.get("t", ""), name, selection=selection, using=using
        )
    except BadFileToken as exc:
        # One answer for every reason (forged, expired, another Target's, another
        # model's): nothing tells whether a model or file exists. The reason is logged.
        logger.warning("file request of %.200s refused: %.500s", name, exc)
        return error_response(403, "bad or expired file token", "bad_file_token")
    except FileOutsideFilter as exc:
        # Its row left the Target's filters since it was listed: gone, for this Target.
        return error_response(404, str(exc), "file_outside_filter")
    except FileNotFoundError:
        return error_response(404, "file listed by the snapshot is gone", "file_missing")
    response = FileResponse(handle, content_type="application/octet-stream")
    response["Content-Length"] = str(size)
    return response


def _describe_files(
    request: HttpRequest, target: str, selection: Selection, using: str
) -> JsonResponse:
    try:
        body = json.loads(request.body)
        items = body["files"]
        if body.get("protocol") != PROTOCOL_VERSION or not isinstance(items, list):
            raise ValueError("expected {'protocol': 1, 'files': [...]}")
        for item in items:
            if not (
                isinstance(item, dict)
                and isinstance(item.get("model"), str)
                and isinstance(item.get("key"), list)
                and isinstance(item.get("field"), str)
                and isinstance(item.get("name"), str)
            ):
                raise ValueError(
                    "each file must be {'model': str, 'key': [...], 'field': str, 'name': str}"
                )
            if "\x00" in item["name"] or "\x00" in json.dumps(item["key"]):
                raise ValueError("a file's name or key contains NUL")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        return error_response(400, f"bad files request: {exc}", "bad_request")
    if len(items) > MAX_DESCRIBE:
        return error_response(400, f"at most {MAX_DESCRIBE} files per request", "bad_request")
    answers = [
        file_serving.describe_current(item, target=target, selection=selection, using=using)
        for item in items
    ]
    return JsonResponse({"protocol": PROTOCOL_VERSION, "files": answers})


_View = TypeVar("_View", bound=Callable[..., Any])


class _EveryDatabase(set[str]):
    """Every database alias, for ``transaction.non_atomic_requests``' record."""

    def __contains__(self, alias: object) -> bool:
        return True


def _non_atomic_on_every_database(view: _View) -> _View:
    """Keep ``ATOMIC_REQUESTS`` away from ``view`` on every database.

    A long-poll must never run inside a request's transaction (on MySQL a
    repeatable-read snapshot would hide the very events it waits for, and any
    database would keep a transaction open for the whole wait), and Django refuses
    to serve an async view at all where ``ATOMIC_REQUESTS`` applies. The feed reads
    the alias ``CHANGEFEED_SYNC_FEED_DATABASE`` names, which is not known at import
    time, where ``transaction.non_atomic_requests`` takes its alias: so every alias.
    """
    setattr(view, "_non_atomic_requests", _EveryDatabase())  # noqa: B010 - a typed callable
    return view


#: Long-polls of this process waiting at once under WSGI (where each holds a thread).
_WSGI_WAITS = longpoll.WaitSlots(conf.feed_wsgi_waiters)
_NO_WAITS = longpoll.WaitSlots(lambda: 0)

#: Feed requests per second a WSGI process answers at most for followers it refused a
#: wait (each costs a few statements): with more followers refused, each is told to
#: come back later than CHANGEFEED_SYNC_FEED_WSGI_RETRY_AFTER.
REFUSED_PER_SECOND = 10.0


class _Refused:
    """The followers this process refused a wait lately, and when they may ask again.

    Each refused follower asks again after ``retry_after``: n of them told the same
    interval r ask n / r times a second. So r grows with n, to keep that at
    ``REFUSED_PER_SECOND`` (at 1 s, 200 followers refused by a 3-process site asked
    about 70 times a second per process, and its pages waited a second for a worker).
    """

    #: Seconds a follower counts as refused after its last refusal.
    WINDOW = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._pruned = 0.0

    def retry_after(self, name: str) -> float:
        now = time.monotonic()
        with self._lock:
            self._last[name] = now
            if now - self._pruned > 1.0:  # at most once a second: followers are many
                self._pruned = now
                self._last = {k: t for k, t in self._last.items() if now - t < self.WINDOW}
            refused = len(self._last)
        return max(conf.feed_wsgi_retry_after(), refused / REFUSED_PER_SECOND)


_REFUSED = _Refused()


def _wsgi_wait_slots(request: HttpRequest) -> longpoll.WaitSlots | None:
    """The waiting slots a request may take: None (no bound) under ASGI, where a wait
    holds no thread; under WSGI at most ``CHANGEFEED_SYNC_FEED_WSGI_WAITERS`` per
    process, and none at all on a server that says it runs one request at a time per
    process (``wsgi.multithread`` false, e.g. gunicorn's sync workers), whose only
    thread a wait would take from every page. Django's test client names no server
    (no ``SERVER_SOFTWARE``): it is one caller calling, and may wait."""
    if not isinstance(request, WSGIRequest):
        return None
    environ = request.environ
    if not environ.get("wsgi.multithread", True) and environ.get("SERVER_SOFTWARE"):
        return _NO_WAITS
    return _WSGI_WAITS


@dataclass(frozen=True)
class _FeedRequest:
    """A feed request that passed authentication and its checks, with its first page."""

    name: str  # the Target's
    since: int
    limit: int
    wait: float
    models: list[str] | None
    source_id: str
    page: feed.FeedPage
    #: Pages as they come, on one answer (``stream=1``), rather than one page.
    stream: bool = False
    #: A filtered Target's part of the feed.
    routed: feed.Routed | None = None


@_non_atomic_on_every_database
async def feed_view(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    """The feed; a long-poll with ``wait``. Async, so that under ASGI a waiting
    follower holds no thread; under WSGI Django runs it in the request's thread, and
    waits are bounded per process (``_wsgi_wait_slots``)."""
    if request.method != "GET":
        # What require_GET answers (it wraps async views only from Django 5.0 on).
        refused = HttpResponseNotAllowed(["GET"])
        log_response(
            "Method Not Allowed (%s): %s", request.method, request.path,
            response=refused, request=request,
        )  # fmt: skip
        return refused
    using = conf.feed_database()
    started = await longpoll.in_db_thread(_start_feed, request, using)
    if isinstance(started, HttpResponse):
        return started
    if started.stream and not isinstance(request, WSGIRequest):
        # Under WSGI a stream would hold a server thread for its whole length: there
        # the follower gets the long-poll's one page (a stream of one line).
        return _streamed(started, using)
    try:
        outcome = await longpoll.aread_or_wait(
            started.since, started.limit, started.wait, using=using, models=started.models,
            source_id=started.source_id, page=started.page, slots=_wsgi_wait_slots(request),
            routed=started.routed,
        )  # fmt: skip
    except CursorExpired as exc:  # pruned while it waited (or a filter changed)
        return _expired(exc)
    # Pages may be shared by followers woken together: each answer gets its own copy.
    page = dataclasses.replace(outcome.page, source_id=started.source_id)
    # The events are spliced in as stored, not decoded and encoded again.
    body = page.to_json()
    if not outcome.refused:
        return HttpResponse(body, content_type="application/json")
    # No room to wait here: the empty page now, and when to ask again. Followers
    # sleep that long (a 200 on which an older follower simply asks again).
    retry_after = round(_REFUSED.retry_after(started.name), 1)
    body = body[:-1] + f',"retry_after":{json.dumps(retry_after)}}}'
    response = HttpResponse(body, content_type="application/json")
    response["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def _streamed(started: _FeedRequest, using: str) -> StreamingHttpResponse:
    """The streamed feed: one JSON page per line as events commit (the first at
    once), an empty line as a heartbeat, an error line if the stream cannot go on;
    it ends after 3/4 of ``wait`` to ``wait`` seconds and the follower asks again
    from its last page."""

    # Ended somewhere in the last quarter of ``wait``: followers that started together
    # (a source restarted, a deploy) do not all come back at the same moment.
    duration = started.wait * random.uniform(0.75, 1.0)

    async def lines() -> AsyncIterator[bytes]:
        pages = longpoll.stream_pages(
            started.since, started.limit, duration, using=using, models=started.models,
            source_id=started.source_id,
            page=dataclasses.replace(started.page, source_id=started.source_id),
            routed=started.routed,
        )  # fmt: skip
        try:
            async for page in pages:
                yield b"\n" if page is None else page.line
        except CursorExpired as exc:  # pruned past the stream's position
            code = "filter_changed" if isinstance(exc, FilterChanged) else "cursor_expired"
            yield _error_line(str(exc), code)
        except Exception:
            # Headers are sent: the status cannot say it any more. Logged here; the
            # follower sees an error line, then the end, and asks again.
            logger.exception("feed stream of %.200s failed", started.name)
            yield _error_line("the source failed while streaming", "stream_failed")

    response = StreamingHttpResponse(lines(), content_type="application/x-ndjson")
    response["X-Accel-Buffering"] = "no"  # nginx would hold the lines back
    response["Cache-Control"] = "no-store"
    return response


def _error_line(message: str, code: str) -> bytes:
    body = {"protocol": PROTOCOL_VERSION, "error": message, "code": code}
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()


def _start_feed(request: HttpRequest, using: str) -> _FeedRequest | HttpResponse:
    """Authentication, parameters, cursor checks and the first page, in one database
    thread (a follower's request must not sit out a busy SQLite source's commits in
    SQLite's ever longer sleeps: sqlite_waits.py)."""
    with prompt_lock_waits(using):
        return _feed(request, using)


def _feed(request: HttpRequest, using: str) -> _FeedRequest | HttpResponse:
    try:
        name, nonce, target = verify(request, using)
    except SignatureError as exc:
        return _refused(request, exc)
    selection = _selection(target)  # its models, and its row filters
    if isinstance(selection, JsonResponse):
        return selection
    routed = _routed(target)
    if isinstance(routed, JsonResponse):
        return routed
    try:
        since = int_param(request, "since", 0)
        limit = int_param(request, "limit", conf.feed_default_limit())
        wait = float_param(request, "wait", 0.0)
        stream = bool_param(request, "stream")
    except ValueError as exc:
        return error_response(400, str(exc), "bad_parameter")
    if since < 0 or limit < 1:
        return error_response(400, "'since' must be >= 0 and 'limit' >= 1", "bad_parameter")
    limit = min(limit, conf.feed_max_limit())
    wait = min(max(wait, 0.0), conf.feed_max_wait())
    try:
        state = feed.check_cursor(since, using)
    except (CursorAhead, CursorExpired) as exc:
        # Refused: the request still counts against replays, its cursor is not recorded.
        try:
            record_request(name, nonce, using)
        except SignatureError as refused:
            return _refused(request, refused)
        if isinstance(exc, CursorAhead):
            return error_response(409, str(exc), "cursor_ahead", position=exc.head,
                          source_id=sequencer.state(using).source_id)  # fmt: skip
        return error_response(410, str(exc), "cursor_expired")
    try:
        record_request(name, nonce, using, seq=since)
    except SignatureError as exc:
        return _refused(request, exc)
    routes.stamp(target, using)
    if since < target.filters_position:
        return error_response(
            410,
            f"Target {target.name!r}'s row filters changed at position "
            f"{target.filters_position}, after its checkpoint {since}: its rows were chosen "
            "by other filters: run a full Data Pull",
            "filter_changed",
        )
    models = selection.model_list()
    try:
        page = longpoll.read(using, since, limit, models, None, routed)
    except CursorExpired as exc:
        return _expired(exc)
    return _FeedRequest(name, since, limit, wait, models, state.source_id, page, stream, routed)
