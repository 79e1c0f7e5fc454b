"""Signed requests between sites: HMAC-SHA256 via itsdangerous, timestamped.

A request carries ``Authorization: Changefeed <name> <token>``. The token
signs the method, the path with its query, a digest of the body and a
random nonce, with the shared secret of ``name``. The receiver accepts any
of the secrets listed for ``name`` (key rotation: itsdangerous signs with
the last key and accepts all), refuses tokens older than
``CHANGEFEED_SYNC_SIGNATURE_MAX_AGE`` and refuses a nonce it has seen.

Two sites' clocks differ. itsdangerous refuses a token whose age is
negative, and its timestamps are whole seconds, so a signer only one second
ahead was refused and a follower stopped. A token is accepted from
``CLOCK_SKEW`` seconds in the future to ``max_age + CLOCK_SKEW`` in the past
(Standard Webhooks and Stripe allow 5 minutes of difference); its nonce is
kept for all of that window, so replays are still refused.
"""

from __future__ import annotations

import hashlib
import secrets as _secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from itsdangerous import BadData, URLSafeTimedSerializer

from . import conf
from .cache import TtlCache
from .exceptions import SignatureError

SCHEME = "Changefeed"
_SALT = "changefeed_sync.request.v1"
#: Seconds two sites' clocks may differ, either way.
CLOCK_SKEW = 60

#: Headers of a pushed batch: the body's signature, and the delivery's id (the
#: Standard Webhooks name), which stays the same across retries.
SIGNATURE_HEADER = "X-Changefeed-Signature"
ID_HEADER = "Webhook-Id"


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
    *,
    max_age: int | None = None,
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
    limit = conf.signature_max_age() if max_age is None else max_age
    try:
        # The age is checked below, allowing for clock skew both ways.
        claims, signed_at = _serializer(keys).loads(token, return_timestamp=True)
    except BadData:
        raise SignatureError(f"bad signature for {name!r}") from None
    if not known:
        raise SignatureError(f"unknown name {name!r}")
    age = time.time() - signed_at.timestamp()
    if age > limit + CLOCK_SKEW:
        raise SignatureError(f"signature of {name!r} expired ({age:.0f} s old)")
    if age < -CLOCK_SKEW:
        raise SignatureError(
            f"signature of {name!r} is dated {-age:.0f} s in the future (clocks differ)"
        )
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


_last_cleanup: dict[str, float] = {}


def remember_nonce(nonce: str, using: str, max_age: int | None = None) -> None:
    """Record a nonce in the caller's transaction; SignatureError if seen before (a replay)."""
    from .models import Nonce

    now = timezone.now()
    if time.monotonic() - _last_cleanup.get(using, 0.0) > 60:
        # Expired nonces go at most once a minute, not on every request.
        _last_cleanup[using] = time.monotonic()
        Nonce.objects.using(using).filter(expires_at__lt=now).delete()
    try:
        with transaction.atomic(using=using):
            Nonce.objects.using(using).create(
                value=nonce,
                # Covers every moment its token is accepted at (see CLOCK_SKEW).
                expires_at=now
                + timedelta(seconds=(max_age or conf.signature_max_age()) + 2 * CLOCK_SKEW + 5),
            )
    except IntegrityError:
        raise SignatureError("replayed request (nonce already used)") from None


def nonce_seen(nonce: str, using: str) -> bool:
    from .models import Nonce

    return bool(Nonce.objects.using(using).filter(value=nonce).exists())


# ---------------------------------------------------------------- OIDC (Cloud Tasks)

# Google's signing certificates by URL, for an hour: the original fetched them on
# every request.
_certs: TtlCache[str, Any] = TtlCache(3600.0)


def _fetch_certs(url: str) -> Any:
    def load() -> Any:
        import requests

        response = requests.get(url, timeout=10)
        response.raise_for_status()
        return response.json()

    return _certs.get(url, load)


def verify_oidc(header: str | None, *, audience: str, email: str) -> dict[str, Any]:
    """Check a Cloud Tasks OIDC token with google-auth; return its claims.

    Verifies the signature against Google's certificates (or those at
    ``CHANGEFEED_SYNC_OIDC_CERTS_URL``), expiry, audience, and that the token
    belongs to the expected service account with a verified email.
    """
    if not header or not header.startswith("Bearer "):
        raise SignatureError("no OIDC bearer token", missing=True)
    from google.auth import jwt

    token = header[len("Bearer ") :]
    url = conf.oidc_certs_url()
    try:
        claims: dict[str, Any] = jwt.decode(  # type: ignore[no-untyped-call]
            token, certs=_fetch_certs(url), audience=audience, clock_skew_in_seconds=CLOCK_SKEW
        )
    except Exception as exc:  # google-auth raises ValueError and its own errors
        raise SignatureError(f"OIDC token rejected: {exc}") from None
    if claims.get("iss") not in ("accounts.google.com", "https://accounts.google.com"):
        raise SignatureError(f"OIDC token issued by {claims.get('iss')!r}, not Google")
    if claims.get("email") != email or not claims.get("email_verified", False):
        raise SignatureError(f"OIDC token of {claims.get('email')!r}, expected {email!r}")
    return claims
