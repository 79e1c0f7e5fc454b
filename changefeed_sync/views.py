"""HTTP endpoints: thin wrappers over feed.py; authentication from signing.py."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.db import transaction
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import conf, feed, files, snapshot
from .exceptions import CursorExpired, SignatureError
from .models import Target
from .serialization import PROTOCOL_VERSION
from .sqlite_waits import prompt_lock_waits, retry_transaction

logger = logging.getLogger("changefeed_sync.views")


def _error(status: int, message: str, **extra: Any) -> JsonResponse:
    response = JsonResponse(
        {"protocol": PROTOCOL_VERSION, "error": message, **extra}, status=status
    )
    if status == 401:
        response["WWW-Authenticate"] = "Changefeed"
    return response


def verify(request: HttpRequest, using: str) -> tuple[str, str, Target]:
    """(target name, nonce, the Target) of a signed feed or snapshot request, or
    SignatureError."""
    from .signing import verify_request

    found: list[Target] = []

    def secrets_for(name: str) -> list[str] | None:
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
    from .signing import remember_nonce

    def write() -> None:
        with transaction.atomic(using=using):
            remember_nonce(nonce, using)
            seen: dict[str, Any] = {"last_seen_at": timezone.now()}
            if seq is not None:
                seen["last_seen_seq"] = seq
            Target.objects.using(using).filter(name=name).update(**seen)

    # Every request writes: on a busy SQLite source, wait for the lock promptly.
    retry_transaction(using, write)


def _int_param(request: HttpRequest, name: str, default: int) -> int:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be an integer, got {raw!r}") from None


def _refused(request: HttpRequest, exc: SignatureError) -> JsonResponse:
    logger.warning("%s request refused: %s", request.path, exc.reason)
    if exc.missing:
        return _error(401, "authentication required")
    return _error(403, "authentication failed")


def _authenticated(request: HttpRequest, using: str) -> str | JsonResponse:
    try:
        name, nonce, _ = verify(request, using)
        record_request(name, nonce, using)
        return name
    except SignatureError as exc:
        return _refused(request, exc)


@transaction.non_atomic_requests
@require_GET
def snapshot_view(request: HttpRequest) -> JsonResponse:
    """Without ``model``: the snapshot's feed position and model order; with it: one page."""
    using = conf.feed_database()
    name = _authenticated(request, using)
    if isinstance(name, JsonResponse):
        return name
    label = request.GET.get("model")
    if not label:
        return JsonResponse(snapshot.start(using))
    after = request.GET.get("after")
    try:
        limit = max(_int_param(request, "limit", 1000), 1)
        digest = _int_param(request, "digest", 0)
        buckets = _int_param(request, "buckets", 0)
        if digest:  # bucket digests: no rows, so many more rows per request
            body = snapshot.digest(
                label, after, min(limit, 100 * conf.feed_max_limit()), digest, using
            )
        else:
            limit = min(limit, conf.feed_max_limit())
            only = request.GET.get("only") if buckets else None
            body = snapshot.page(label, after, limit, using, buckets or None, only)
    except LookupError as exc:
        return _error(404, str(exc))
    except (ValueError, TypeError) as exc:
        return _error(400, f"bad snapshot request: {exc}")
    return JsonResponse(body)


#: Most files one ``POST files/`` may ask about.
MAX_DESCRIBE = 1000


@csrf_exempt
@transaction.non_atomic_requests
@require_http_methods(["GET", "POST"])
def file_view(request: HttpRequest) -> FileResponse | JsonResponse:
    """GET: the bytes of one file a token names (from a snapshot page or a POST here).
    POST: describe the files an increment references (files.describe_current)."""
    using = conf.feed_database()
    try:
        name, nonce, target = verify(request, using)
        record_request(name, nonce, using)
    except SignatureError as exc:
        return _refused(request, exc)
    if request.method == "POST":
        return _describe_files(request, target, using)
    try:
        handle, size = files.open_listed(request.GET.get("t", ""), name)
    except files.BadFileToken as exc:
        return _error(403, str(exc))
    except FileNotFoundError:
        return _error(404, "file listed by the snapshot is gone", code="file_missing")
    response = FileResponse(handle, content_type="application/octet-stream")
    response["Content-Length"] = str(size)
    return response


def _describe_files(request: HttpRequest, target: Target, using: str) -> JsonResponse:
    try:
        body = json.loads(request.body)
        items = body["files"]
        if body.get("protocol") != PROTOCOL_VERSION or not isinstance(items, list):
            raise ValueError("expected {'protocol': 1, 'files': [...]}")
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, f"bad files request: {exc}")
    if len(items) > MAX_DESCRIBE:
        return _error(400, f"at most {MAX_DESCRIBE} files per request")
    models = target.model_labels or None
    answers = [
        files.describe_current(item, target=target.name, models=models, using=using)
        for item in items
    ]
    return JsonResponse({"protocol": PROTOCOL_VERSION, "files": answers})


# Long-polls must not hold a transaction (ATOMIC_REQUESTS): on MySQL a
# repeatable-read snapshot would hide the very events they wait for.
@transaction.non_atomic_requests
@require_GET
def feed_view(request: HttpRequest) -> HttpResponse:
    using = conf.feed_database()
    # A follower's request must not sit out a busy SQLite source's commits in
    # SQLite's ever longer sleeps (sqlite_waits.py).
    with prompt_lock_waits(using):
        return _feed(request, using)


def _feed(request: HttpRequest, using: str) -> HttpResponse:
    try:
        name, nonce, target = verify(request, using)
    except SignatureError as exc:
        return _refused(request, exc)
    try:
        since = _int_param(request, "since", 0)
        limit = _int_param(request, "limit", conf.feed_default_limit())
        wait = float(request.GET.get("wait") or 0)
    except ValueError as exc:
        return _error(400, str(exc))
    if since < 0 or limit < 1:
        return _error(400, "'since' must be >= 0 and 'limit' >= 1")
    limit = min(limit, conf.feed_max_limit())
    wait = min(max(wait, 0.0), conf.feed_max_wait())
    try:
        record_request(name, nonce, using, seq=since)
    except SignatureError as exc:
        return _refused(request, exc)
    models = target.model_labels or None
    try:
        page = feed.read_or_wait(since, limit, wait, using=using, models=models)
    except CursorExpired as exc:
        return _error(410, str(exc), code="cursor_expired")
    # The events are spliced in as stored, not decoded and encoded again.
    return HttpResponse(page.to_json(), content_type="application/json")


@csrf_exempt
@transaction.non_atomic_requests
@require_POST
def webhook_view(request: HttpRequest, source_name: str) -> JsonResponse:
    """Receive a pushed batch from the Data Source ``source_name`` (target side)."""
    from . import webhook
    from .exceptions import ApplyError, ChangefeedError, SourceUnavailable
    from .files import TransferDeadline
    from .increment_files import webhook_files_seconds
    from .models import DataSource
    from .push import SIGNATURE_HEADER
    from .signing import nonce_seen, verify_oidc, verify_request

    deadline = time.monotonic() + webhook_files_seconds()
    length = int(request.headers.get("Content-Length") or 0)
    if length > conf.webhook_max_bytes():
        return _error(413, f"body larger than {conf.webhook_max_bytes()} bytes")
    using = conf.target_database()
    source = DataSource.objects.using(using).filter(name=source_name).first()
    if source is None:
        return _error(404, f"unknown source {source_name!r}")
    try:
        if source.oidc_service_account:
            verify_oidc(
                request.headers.get("Authorization"),
                audience=source.oidc_audience or request.build_absolute_uri(),
                email=source.oidc_service_account,
            )
        _, nonce = verify_request(
            request.headers.get(SIGNATURE_HEADER),
            "POST",
            request.get_full_path(),
            request.body,
            lambda name: source.secret_list() if name == source.client_name else None,
            max_age=conf.webhook_tolerance(),
        )
    except SignatureError as exc:
        logger.warning("webhook for %s refused: %s", source_name, exc.reason)
        if exc.missing:
            return _error(401, "authentication required")
        return _error(403, "authentication failed")
    try:
        body = json.loads(request.body)
        webhook.parse(body)
    except (ValueError, ChangefeedError) as exc:
        return _error(400, f"malformed webhook body: {exc}")
    if nonce_seen(nonce, using):
        # The identical request came before. Cloud Tasks retries a delivery whose
        # answer was lost with the very same request: if its batch is applied,
        # acknowledge it (writing nothing) so it stops; otherwise refuse it.
        source.refresh_from_db(using=using, fields=["checkpoint"])
        if int(body["last_seq"]) <= source.checkpoint:
            return JsonResponse(
                {
                    "protocol": PROTOCOL_VERSION,
                    "status": "duplicate",
                    "checkpoint": source.checkpoint,
                    "applied": 0,
                }
            )
        return _error(409, "replayed delivery (this signature was used before)")
    try:
        outcome, stats = webhook.receive(source, body, using=using, nonce=nonce, deadline=deadline)
    except TransferDeadline as exc:
        # The sender must have its answer in time; the retry goes on from the
        # files downloaded so far.
        response = _error(503, f"files still downloading: {exc}", code="files_pending")
        response["Retry-After"] = "1"
        return response
    except SourceUnavailable as exc:
        return _error(503, f"catching up from the feed failed: {exc}")
    except ApplyError as exc:
        return _error(422, str(exc))
    except SignatureError:
        return _error(409, "replayed delivery (this signature was used before)")
    except ChangefeedError as exc:
        return _error(502, str(exc))
    return JsonResponse(
        {
            "protocol": PROTOCOL_VERSION,
            "status": outcome,
            "checkpoint": source.checkpoint,
            "applied": stats.events if stats else 0,
        }
    )
