"""OIDC verification of Cloud Tasks webhooks, through google-auth's real code.

A test RSA key (cryptography) signs ID tokens with google-auth's own signer; its
certificate is served as ``{kid: PEM}`` (the shape of Google's v1 certs endpoint) by
an HTTP server on 127.0.0.1, which ``CHANGEFEED_SYNC_OIDC_CERTS_URL`` points at.
``signing.verify_oidc`` is tested directly, then through the webhook view of a live
server: the source is the "default" database, the webhook applies into PostgreSQL.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from django.test import override_settings
from google.auth import crypt, jwt

from changefeed_sync import signing
from changefeed_sync.exceptions import SignatureError
from changefeed_sync.models import DataSource, Nonce, Target
from changefeed_sync.source import push
from tests.dbs import require_alias
from tests.testapp.models import Country

#: Only the webhook tests touch databases: the source ("default") and the target (PostgreSQL).
webhook_db = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])

ACCOUNT = "pusher@changefeed-test.iam.gserviceaccount.com"
AUDIENCE = "https://target.example/sync/webhook/hq/"


# ---------------------------------------------------------------------- keys and tokens


@dataclass
class Key:
    kid: str
    private_pem: bytes
    cert_pem: str

    @classmethod
    def generate(cls, kid: str) -> Key:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test key {kid}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(private, hashes.SHA256())
        )
        private_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(kid, private_pem, cert.public_bytes(serialization.Encoding.PEM).decode())

    def token(self, *, kid: str | None = None, **overrides: Any) -> str:
        """An ID token as Cloud Tasks sends it; ``overrides`` replace claims (None drops one)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "azp": "1234567890",
            "sub": "1234567890",
            "email": ACCOUNT,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        signer = crypt.RSASigner.from_string(self.private_pem, key_id=kid or self.kid)
        return jwt.encode(signer, claims).decode()


@pytest.fixture(scope="module")
def key() -> Key:
    return Key.generate("test-kid-1")


@pytest.fixture(scope="module")
def other_key() -> Key:
    return Key.generate("test-kid-2")


# ---------------------------------------------------------------------- certs server


@dataclass
class CertsServer:
    certs: dict[str, str]
    url: str = ""
    hits: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def certs_server(key: Key) -> Iterator[CertsServer]:
    served = CertsServer(certs={key.kid: key.cert_pem})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            served.hits.append(self.path)
            body = json.dumps(served.certs).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.url = f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def certs(certs_server: CertsServer, key: Key) -> Iterator[CertsServer]:
    """The loopback certs, configured; signing's certificate cache emptied before and after."""
    certs_server.certs = {key.kid: key.cert_pem}
    certs_server.hits.clear()
    signing._certs.clear()
    with override_settings(CHANGEFEED_SYNC_OIDC_CERTS_URL=certs_server.url):
        yield certs_server
    signing._certs.clear()


def verify(token_header: str | None, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("audience", AUDIENCE)
    kwargs.setdefault("email", ACCOUNT)
    return signing.verify_oidc(token_header, **kwargs)


# ---------------------------------------------------------------------- verify_oidc


def test_a_valid_token_is_accepted_and_certs_are_fetched_once(certs: CertsServer, key: Key) -> None:
    claims = verify(f"Bearer {key.token()}")
    assert claims["email"] == ACCOUNT and claims["aud"] == AUDIENCE
    verify(f"Bearer {key.token()}")
    # Cached: the original fetched Google's certs on every request.
    assert certs.hits == ["/oauth2/v1/certs"]


@pytest.mark.parametrize(
    "claims, expected",
    [
        ({"aud": "https://elsewhere.example/sync/webhook/hq/"}, "audience"),
        ({"email": "intruder@evil.iam.gserviceaccount.com"}, "intruder"),
        ({"email_verified": False}, "expected"),
        ({"email_verified": None}, "expected"),
        ({"email": None}, "expected"),
        # Expired well beyond the allowed clock skew (10 s).
        ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "xpired"),
        ({"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200}, "early"),
    ],
    ids=["wrong-audience", "wrong-email", "unverified-email", "no-email-verified",
         "no-email", "expired", "not-yet-valid"],
)
def test_tokens_with_wrong_claims_are_refused(
    certs: CertsServer, key: Key, claims: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SignatureError) as refused:
        verify(f"Bearer {key.token(**claims)}")
    assert not refused.value.missing
    assert expected in str(refused.value)


def test_a_token_signed_by_another_key_is_refused(
    certs: CertsServer, key: Key, other_key: Key
) -> None:
    # Same kid as the served certificate, signed by another private key: a forgery.
    with pytest.raises(SignatureError, match="signature"):
        verify(f"Bearer {other_key.token(kid=key.kid)}")
    # A key id the certs do not list.
    with pytest.raises(SignatureError, match="test-kid-2"):
        verify(f"Bearer {other_key.token()}")


def test_unsigned_and_malformed_tokens_are_refused(certs: CertsServer, key: Key) -> None:
    header, payload, _ = key.token().split(".")
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    for token in [f"{none_header}.{payload}.", f"{header}.{payload}.", "garbage", "a.b.c"]:
        with pytest.raises(SignatureError) as refused:
            verify(f"Bearer {token}")
        assert not refused.value.missing


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwdw==", "bearer x", "Bearer"])
def test_a_missing_bearer_token_is_reported_as_missing(
    certs: CertsServer, header: str | None
) -> None:
    with pytest.raises(SignatureError) as refused:
        verify(header)
    assert refused.value.missing
    assert certs.hits == []  # nothing fetched for a request that carries no token


def test_a_key_rotated_in_is_accepted_once_the_certs_are_fetched_again(
    certs: CertsServer, key: Key, other_key: Key
) -> None:
    verify(f"Bearer {key.token()}")
    certs.certs = {key.kid: key.cert_pem, other_key.kid: other_key.cert_pem}
    signing._certs.clear()  # the hour of caching has passed
    verify(f"Bearer {other_key.token()}")
    assert len(certs.hits) == 2


def test_unreachable_certs_refuse_the_token(key: Key) -> None:
    signing._certs.clear()
    with override_settings(CHANGEFEED_SYNC_OIDC_CERTS_URL="http://127.0.0.1:9/certs"):
        with pytest.raises(SignatureError):
            verify(f"Bearer {key.token()}")
    signing._certs.clear()


def test_a_token_from_another_issuer_is_refused(certs: CertsServer, key: Key) -> None:
    with pytest.raises(SignatureError):
        verify(f"Bearer {key.token(iss='https://issuer.example')}")


# ---------------------------------------------------------------------- the webhook view


@pytest.fixture
def tgt() -> Iterator[str]:
    require_alias("postgres")
    with override_settings(
        CHANGEFEED_SYNC_TARGET_DATABASE="postgres", CHANGEFEED_SYNC_DELIVERY_BACKEND=None
    ):
        yield "postgres"


@dataclass
class Webhook:
    url: str
    batch: push.Batch
    source: DataSource
    alias: str

    def post(self, bearer: str | None, *, signed: bool = True) -> requests.Response:
        headers = push.signed_headers(self.batch) if signed else {}
        if bearer is not None:
            headers["Authorization"] = bearer
        return requests.post(self.url, data=self.batch.body, headers=headers, timeout=10)

    def nothing_written(self) -> bool:
        self.source.refresh_from_db(using=self.alias)
        return (
            Country.objects.using(self.alias).count() == 0
            and self.source.checkpoint == 0
            and Nonce.objects.using(self.alias).count() == 0
        )


@pytest.fixture
def webhook(live_server: Any, tgt: str, certs: CertsServer) -> Webhook:
    url = live_server.url + "/sync/webhook/hq/"
    source = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets="pw",
        oidc_service_account=ACCOUNT,
    )
    target = Target.objects.create(name="regional", secrets="pw", webhook_url=url)
    Country.objects.create(code="fr", name="France")
    batch = next(push.batches(target, "default"))
    return Webhook(url, batch, source, tgt)


@webhook_db
def test_webhook_accepts_a_valid_token(webhook: Webhook, key: Key) -> None:
    # Cloud Tasks' default audience is the task's URL: here, the URL the request reached.
    answer = webhook.post(f"Bearer {key.token(aud=webhook.url)}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "applied"
    assert Country.objects.using(webhook.alias).get().name == "France"
    webhook.source.refresh_from_db(using=webhook.alias)
    assert webhook.source.checkpoint == webhook.batch.last_seq


@webhook_db
def test_webhook_refuses_bad_tokens_and_writes_nothing(
    webhook: Webhook, key: Key, other_key: Key
) -> None:
    aud = webhook.url
    now = int(time.time())
    refusals = {
        "no Authorization": (None, 401),
        "not a bearer": ("Basic dXNlcjpwdw==", 401),
        "wrong audience": (f"Bearer {key.token(aud=AUDIENCE)}", 403),
        "wrong email": (f"Bearer {key.token(aud=aud, email='x@evil.example')}", 403),
        "unverified email": (f"Bearer {key.token(aud=aud, email_verified=False)}", 403),
        "expired": (f"Bearer {key.token(aud=aud, iat=now - 7200, exp=now - 3600)}", 403),
        "other key": (f"Bearer {other_key.token(aud=aud, kid=key.kid)}", 403),
        "garbage": ("Bearer not.a.token", 403),
    }
    for what, (bearer, status) in refusals.items():
        answer = webhook.post(bearer)
        assert answer.status_code == status, (what, answer.status_code, answer.text)
        assert "events" not in answer.text and "applied" not in answer.text, what
        assert webhook.nothing_written(), what
    # A valid token does not stand in for the body's HMAC signature.
    answer = webhook.post(f"Bearer {key.token(aud=aud)}", signed=False)
    assert answer.status_code == 401, answer.text
    assert webhook.nothing_written()


@webhook_db
def test_webhook_checks_the_configured_audience(webhook: Webhook, key: Key) -> None:
    """Behind a proxy the URL Django sees is not the one Cloud Tasks called: the Data
    Source names the audience instead."""
    public = "https://sync.example.com/sync/webhook/hq/"
    DataSource.objects.using(webhook.alias).filter(pk=webhook.source.pk).update(
        oidc_audience=public
    )
    answer = webhook.post(f"Bearer {key.token(aud=webhook.url)}")
    assert answer.status_code == 403, answer.text
    assert webhook.nothing_written()
    answer = webhook.post(f"Bearer {key.token(aud=public)}")
    assert answer.status_code == 200, answer.text
    assert Country.objects.using(webhook.alias).count() == 1
