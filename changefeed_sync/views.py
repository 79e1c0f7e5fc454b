"""HTTP endpoints: thin wrappers over feed.py; authentication from signing.py."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from . import conf, feed, snapshot
from .exceptions import CursorExpired, SignatureError
from .models import Target
from .serialization import PROTOCOL_VERSION

logger = logging.getLogger("changefeed_sync.views")


def _error(status: int, message: str, **extra: Any) -> JsonResponse:
    response = JsonResponse(
        {"protocol": PROTOCOL_VERSION, "error": message, **extra}, status=status
    )
    if status == 401:
        response["WWW-Authenticate"] = "Changefeed"
    return response


def _secrets_for(using: str) -> Any:
    def lookup(name: str) -> list[str] | None:
        target = Target.objects.using(using).filter(name=name, active=True).first()
        return target.secret_list() if target is not None else None

    return lookup


def authenticate(request: HttpRequest, using: str) -> str:
    """Name of the target that signed this request, or SignatureError."""
    from .signing import remember_nonce, verify_request

    name, nonce = verify_request(
        request.headers.get("Authorization"),
        request.method or "GET",
        request.get_full_path(),
        request.body,
        _secrets_for(using),
    )
    remember_nonce(nonce, using)
    return name


def _int_param(request: HttpRequest, name: str, default: int) -> int:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be an integer, got {raw!r}") from None


def _authenticated(request: HttpRequest, using: str) -> str | JsonResponse:
    try:
        return authenticate(request, using)
    except SignatureError as exc:
        logger.warning("%s request refused: %s", request.path, exc.reason)
        if exc.missing:
            return _error(401, "authentication required")
        return _error(403, "authentication failed")


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
    try:
        limit = min(max(_int_param(request, "limit", 1000), 1), conf.feed_max_limit())
    except ValueError as exc:
        return _error(400, str(exc))
    try:
        return JsonResponse(snapshot.page(label, request.GET.get("after"), limit, using))
    except LookupError as exc:
        return _error(404, str(exc))
    except (ValueError, TypeError) as exc:
        return _error(400, f"bad 'after' cursor: {exc}")


# Long-polls must not hold a transaction (ATOMIC_REQUESTS): on MySQL a
# repeatable-read snapshot would hide the very events they wait for.
@transaction.non_atomic_requests
@require_GET
def feed_view(request: HttpRequest) -> JsonResponse:
    using = conf.feed_database()
    name = _authenticated(request, using)
    if isinstance(name, JsonResponse):
        return name
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
    Target.objects.using(using).filter(name=name).update(
        last_seen_at=timezone.now(), last_seen_seq=since
    )
    try:
        page = feed.read_or_wait(since, limit, wait, using=using)
    except CursorExpired as exc:
        return _error(410, str(exc), code="cursor_expired")
    return JsonResponse(page.to_wire())
