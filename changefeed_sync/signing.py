"""Signed requests between sites: HMAC-SHA256 via itsdangerous, timestamped.

A request carries ``Authorization: Changefeed <name> <token>``. The token
signs the method, the path with its query, a digest of the body and a
random nonce, with the shared secret of ``name``. The receiver accepts any
of the secrets listed for ``name`` (key rotation: itsdangerous signs with
the last key and accepts all), refuses tokens older than
``CHANGEFEED_SYNC_SIGNATURE_MAX_AGE`` and refuses a nonce it has seen.
"""

from __future__ import annotations

import hashlib
import secrets as _secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer

from . import conf
from .exceptions import SignatureError

SCHEME = "Changefeed"
_SALT = "changefeed_sync.request.v1"


def _serializer(secret_keys: list[str]) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(
        secret_keys, salt=_SALT, signer_kwargs={"digest_method": hashlib.sha256}
    )


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign_request(
    name: str, secret_keys: list[str], method: str, path: str, body: bytes = b""
) -> str:
    """The Authorization header value for one request."""
    if not secret_keys:
        raise SignatureError("no secret configured")
    token = _serializer(secret_keys).dumps(
        {"m": method.upper(), "p": path, "b": body_digest(body), "n": _secrets.token_hex(16)}
    )
    return f"{SCHEME} {name} {token}"


def verify_request(
    header: str | None,
    method: str,
    path: str,
    body: bytes,
    secrets_for: Callable[[str], list[str] | None],
) -> tuple[str, str]:
    """Check a request's Authorization header; return (name, nonce) or raise SignatureError.

    Does not record the nonce: call ``remember_nonce`` once the caller knows
    the request is otherwise acceptable.
    """
    if not header:
        raise SignatureError("no Authorization header", missing=True)
    parts = header.split(" ")
    if len(parts) != 3 or parts[0] != SCHEME:
        raise SignatureError("Authorization header is not 'Changefeed <name> <token>'")
    _, name, token = parts
    keys = secrets_for(name)
    if not keys:
        # Same work as a real check, so timing does not tell which names exist.
        keys = [_secrets.token_hex(16)]
        known = False
    else:
        known = True
    try:
        claims: Any = _serializer(keys).loads(token, max_age=conf.signature_max_age())
    except SignatureExpired:
        raise SignatureError(f"signature of {name!r} expired") from None
    except BadData:
        raise SignatureError(f"bad signature for {name!r}") from None
    if not known:
        raise SignatureError(f"unknown name {name!r}")
    if not isinstance(claims, dict):
        raise SignatureError("malformed token")
    if claims.get("m") != method.upper() or claims.get("p") != path:
        raise SignatureError(f"token of {name!r} was signed for another request")
    if claims.get("b") != body_digest(body):
        raise SignatureError(f"token of {name!r} was signed for another body")
    nonce = claims.get("n")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise SignatureError("malformed nonce")
    return name, nonce


def remember_nonce(nonce: str, using: str) -> None:
    """Record a nonce; raise SignatureError if it was seen before (a replay)."""
    from .models import Nonce

    now = timezone.now()
    Nonce.objects.using(using).filter(expires_at__lt=now).delete()
    try:
        with transaction.atomic(using=using):
            Nonce.objects.using(using).create(
                value=nonce, expires_at=now + timedelta(seconds=conf.signature_max_age() + 5)
            )
    except IntegrityError:
        raise SignatureError("replayed request (nonce already used)") from None
