"""The target's one endpoint: a pushed batch from a Data Source arrives here.

A thin view: it checks the request (size, signature, OIDC, replay) and maps
what ``webhook.receive`` did, or refused, to an answer. Every refusal has a
stable ``code`` (README "Wire protocol").
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .. import conf
from ..exceptions import (
    ApplyError,
    ChangefeedError,
    FramingError,
    SignatureError,
    SourceReset,
    SourceUnavailable,
    TransferDeadline,
)
from ..http import error_response, plausible_name, shown
from ..models import DataSource
from ..serialization import PROTOCOL_VERSION
from ..signing import SIGNATURE_HEADER, nonce_seen, verify_oidc, verify_request
from . import webhook

logger = logging.getLogger("changefeed_sync.views")


@csrf_exempt
@transaction.non_atomic_requests
@require_POST
def webhook_view(request: HttpRequest, source_name: str) -> JsonResponse:
    """Receive a pushed batch from the Data Source ``source_name``."""
    deadline = time.monotonic() + conf.webhook_files_seconds()
    too_large = _length_refused(request)
    if too_large is not None:
        return too_large
    using = conf.target_database()
    signed = _authenticated_source(request, source_name, using)
    if isinstance(signed, JsonResponse):
        return signed
    source, nonce = signed
    try:
        body = json.loads(request.body)
        since, last_seq, events = webhook.parse(body)
    except FramingError as exc:  # before ChangefeedError, its base
        return error_response(422, f"webhook body refused: {exc}", exc.code)
    except (ValueError, RecursionError, ChangefeedError) as exc:
        return error_response(400, f"malformed webhook body: {exc}", "malformed_body")
    if nonce_seen(nonce, using):
        return _repeated(source, last_seq, using)
    return _received(source, body, using, nonce, deadline)


def _length_refused(request: HttpRequest) -> JsonResponse | None:
    raw_length = request.headers.get("Content-Length") or "0"
    if not raw_length.isascii() or not raw_length.isdigit():
        return error_response(
            400, f"Content-Length must be a number of bytes, got {shown(raw_length)}",
            "bad_content_length",
        )  # fmt: skip
    if int(raw_length) > conf.webhook_max_bytes():
        return error_response(
            413, f"body larger than {conf.webhook_max_bytes()} bytes", "body_too_large"
        )
    return None


def _authenticated_source(
    request: HttpRequest, source_name: str, using: str
) -> tuple[DataSource, str] | JsonResponse:
    """The Data Source that signed this request and the request's nonce, or the refusal."""
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        # Whatever the name: nothing tells a known source from an unknown one.
        logger.warning("webhook for %.200s refused: no signature", source_name)
        return error_response(401, "authentication required", "authentication_required")
    source = (
        DataSource.objects.using(using).filter(name=source_name).first()
        if plausible_name(source_name)
        else None
    )
    try:
        if source is None:
            raise SignatureError(f"unknown source {source_name[:200]!r}")
        known = source
        # The body's signature first: without the shared secret, every answer is
        # the same 403 whether the source exists, and whether it uses OIDC.
        _, nonce = verify_request(
            signature,
            "POST",
            request.get_full_path(),
            request.body,
            lambda name: known.secret_list() if name == known.client_name else None,
            max_age=conf.webhook_tolerance(),
        )
        if source.oidc_service_account:
            verify_oidc(
                request.headers.get("Authorization"),
                audience=source.oidc_audience or request.build_absolute_uri(),
                email=source.oidc_service_account,
            )
    except SignatureError as exc:
        logger.warning("webhook for %.200s refused: %.500s", source_name, exc.reason)
        if exc.missing:
            return error_response(401, "authentication required", "authentication_required")
        return error_response(403, "authentication failed", "authentication_failed")
    return source, nonce


def _repeated(source: DataSource, last_seq: int, using: str) -> JsonResponse:
    """The identical request came before. Cloud Tasks retries a delivery whose
    answer was lost with the very same request: if its batch is applied,
    acknowledge it (writing nothing) so it stops; otherwise refuse it."""
    source.refresh_from_db(using=using, fields=["checkpoint"])
    if last_seq <= source.checkpoint:
        return _answer(source, "duplicate", 0)
    return error_response(409, "replayed delivery (this signature was used before)", "replayed")


def _received(
    source: DataSource, body: Any, using: str, nonce: str, deadline: float
) -> JsonResponse:
    try:
        outcome, stats = webhook.receive(source, body, using=using, nonce=nonce, deadline=deadline)
    except TransferDeadline as exc:
        # The sender must have its answer in time; the retry goes on from the
        # files downloaded so far.
        response = error_response(503, f"files still downloading: {exc}", "files_pending")
        response["Retry-After"] = "1"
        return response
    except SourceReset as exc:
        # The checkpoint belongs to another source (or to this one before a reset).
        DataSource.objects.using(using).filter(pk=source.pk).update(
            last_error=str(exc)[:2000], last_error_at=timezone.now()
        )
        return error_response(409, str(exc), "source_reset")
    except SourceUnavailable as exc:
        return error_response(503, f"catching up from the feed failed: {exc}", "source_unavailable")
    except ApplyError as exc:
        return error_response(422, str(exc), "apply_failed")
    except SignatureError:
        return error_response(409, "replayed delivery (this signature was used before)", "replayed")
    except ChangefeedError as exc:
        return error_response(502, f"catching up from the feed failed: {exc}", "source_error")
    return _answer(source, outcome, stats.events if stats else 0)


def _answer(source: DataSource, status: str, applied: int) -> JsonResponse:
    return JsonResponse(
        {
            "protocol": PROTOCOL_VERSION,
            "status": status,
            "checkpoint": source.checkpoint,
            "applied": applied,
        }
    )
