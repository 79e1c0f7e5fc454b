"""Shared secrets: at least 32 random bytes where they are entered, never split on spaces.

The rule applies in model validation (``full_clean``, the admin's forms), not in
``save()``: fixtures and existing rows with short test secrets keep working.
The admin's side (write-only field, generated suggestion, rotation) is in test_admin.py.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.utils import get_random_secret_key

from changefeed_sync.models import (
    SECRET_MIN_BITS,
    DataSource,
    Target,
    generate_secret,
    secret_bits,
    split_secrets,
    validate_secret,
    validate_secrets,
)
from changefeed_sync.signing import sign_request, verify_request

pytestmark = pytest.mark.django_db

STRONG = "kQ2vX9-LwZ4pT7_hR1mN6sB3yD8fJ5cG0aE2uV7xK4o"  # 43 base64url characters, 258 bits

# --------------------------------------------------------------------------- strength


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(generate_secret, id="generate_secret"),
        pytest.param(lambda: secrets.token_urlsafe(32), id="token_urlsafe(32)"),
        pytest.param(lambda: secrets.token_hex(32), id="token_hex(32)"),
        pytest.param(lambda: secrets.token_hex(32).upper(), id="TOKEN_HEX(32)"),
        pytest.param(lambda: base64.b64encode(os.urandom(32)).decode(), id="openssl-base64-32"),
        pytest.param(get_random_secret_key, id="django-secret-key"),
    ],
)
def test_32_random_bytes_in_the_usual_encodings_are_accepted(make: Callable[..., Any]) -> None:
    for _ in range(500):
        secret = make()
        assert secret_bits(secret) >= SECRET_MIN_BITS, secret
        validate_secret(secret)


def test_generated_secrets_are_new_each_time() -> None:
    made = {generate_secret() for _ in range(100)}
    assert len(made) == 100
    assert all(len(s) == 43 for s in made)


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("Q", id="one character"),
        pytest.param("test-secret", id="a word"),
        pytest.param("s3cret-Qx7vLp2-never-shown", id="a made-up password"),
        pytest.param(secrets.token_urlsafe(24), id="24 random bytes"),
        pytest.param(secrets.token_hex(31), id="31 random bytes in hex"),
        pytest.param("a" * 200, id="one character repeated"),
        pytest.param("ab" * 100, id="two characters repeated"),
        pytest.param("0123456789abcdef" * 4, id="a pattern as long as a hex key"),
        pytest.param("9" * 80, id="digits"),
        pytest.param("1234567890" * 8, id="counting"),
    ],
)
def test_weak_secrets_are_refused_without_echoing_them(secret: str) -> None:
    assert secret_bits(secret) < SECRET_MIN_BITS
    with pytest.raises(ValidationError) as caught:
        validate_secret(secret)
    assert caught.value.code == "secret_too_weak"
    message = " ".join(caught.value.messages)
    assert "32 random bytes" in message
    assert secret not in message


def test_a_line_break_is_refused_inside_one_secret() -> None:
    # Line breaks separate secrets: one secret containing one would be stored as two.
    with pytest.raises(ValidationError) as caught:
        validate_secret(f"{STRONG}\n{generate_secret()}")
    assert caught.value.code == "secret_line_break"


def test_a_long_passphrase_with_spaces_is_one_secret() -> None:
    phrase = " ".join(secrets.token_urlsafe(16) for _ in range(3))
    validate_secret(phrase)
    assert split_secrets(phrase) == [phrase]


# --------------------------------------------------------------------------- several secrets


def test_validate_secrets_checks_every_listed_secret() -> None:
    validate_secrets(f"{STRONG}\n{generate_secret()}\n")
    with pytest.raises(ValidationError) as caught:
        validate_secrets(f"short-old-one\n{STRONG}")
    (message,) = caught.value.messages
    assert message.startswith("Secret 1 of 2: This secret is too weak")
    assert "short-old-one" not in message
    with pytest.raises(ValidationError, match="A secret is required"):
        validate_secrets(" \n\n")


@pytest.mark.parametrize(
    ("stored", "listed"),
    [
        ("one", ["one"]),
        ("old\nnew", ["old", "new"]),
        ("old\r\nnew\r\n", ["old", "new"]),  # Windows line ends
        ("\n  old  \n\n new\n", ["old", "new"]),  # blank lines, surrounding spaces
        ("correct horse battery staple", ["correct horse battery staple"]),  # never on spaces
        ("a b\tc\nd e", ["a b\tc", "d e"]),
        ("a\x0bb\x0cc\u2028d\x85e", ["a\x0bb\x0cc\u2028d\x85e"]),  # str.splitlines() would split
    ],
)
def test_split_secrets_splits_on_line_breaks_only(stored: str, listed: list[str]) -> None:
    assert split_secrets(stored) == listed


# --------------------------------------------------------------------------- the models

MODELS = [
    pytest.param(
        lambda secrets: Target(name="staging", secrets=secrets),
        id="target",
    ),
    pytest.param(
        lambda secrets: DataSource(
            name="production",
            url="https://source.example/sync/",
            client_name="staging",
            secrets=secrets,
        ),
        id="datasource",
    ),
]


@pytest.mark.parametrize("make", MODELS)
def test_full_clean_refuses_a_weak_secret(make: Callable[..., Any]) -> None:
    obj = make("x")
    with pytest.raises(ValidationError) as caught:
        obj.full_clean()
    assert list(caught.value.message_dict) == ["secrets"]
    assert "too weak" in caught.value.message_dict["secrets"][0]


@pytest.mark.parametrize("make", MODELS)
def test_full_clean_accepts_strong_secrets_and_a_rotation(make: Callable[..., Any]) -> None:
    make(STRONG).full_clean()
    make(f"{STRONG}\n{generate_secret()}").full_clean()


@pytest.mark.parametrize("make", MODELS)
def test_full_clean_refuses_a_weak_secret_kept_for_a_rotation(make: Callable[..., Any]) -> None:
    with pytest.raises(ValidationError, match="Secret 1 of 2"):
        make(f"legacy\n{STRONG}").full_clean()


@pytest.mark.parametrize("make", MODELS)
def test_save_does_not_validate(make: Callable[..., Any]) -> None:
    """Rows written by code (fixtures, tests/helpers.py, existing rows) keep working:
    the rule is model validation's, as for every Django validator."""
    obj = make("test-secret")
    obj.save()
    obj.refresh_from_db()
    assert obj.secret_list() == ["test-secret"]


def test_a_secret_with_spaces_signs_and_verifies_whole() -> None:
    """The admin used to store "a b c" as three secrets, each one accepted alone."""
    phrase = " ".join(secrets.token_urlsafe(16) for _ in range(3))
    target = Target.objects.create(name="staging", secrets=phrase)
    source = DataSource.objects.create(
        name="production", url="https://source.example/sync/", client_name="staging", secrets=phrase
    )
    assert target.secret_list() == [phrase] == source.secret_list()
    header = sign_request("staging", source.secret_list(), "GET", "/sync/feed/?since=0")
    lookup = {"staging": target.secret_list()}.get
    assert verify_request(header, "GET", "/sync/feed/?since=0", b"", lookup)[0] == "staging"

    one_word = phrase.split()[-1]
    forged = sign_request("staging", [one_word], "GET", "/sync/feed/?since=0")
    with pytest.raises(Exception, match="bad signature"):
        verify_request(forged, "GET", "/sync/feed/?since=0", b"", lookup)


def test_stored_one_secret_per_line_values_keep_working() -> None:
    """Rows saved by the old admin (words of the input, one per line) still verify."""
    old, new = generate_secret(), generate_secret()
    target = Target.objects.create(name="staging", secrets=f"{old}\n{new}")
    lookup = {"staging": target.secret_list()}.get
    for key in (old, new):
        header = sign_request("staging", [key], "POST", "/sync/files/", b"{}")
        assert verify_request(header, "POST", "/sync/files/", b"{}", lookup)[0] == "staging"


def test_no_migration_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    call_command("makemigrations", "changefeed_sync", "--check", "--dry-run")
