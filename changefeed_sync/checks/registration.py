"""Checks of the registered models: natural keys, field lists, what must never be
synced (accounts, secrets) and relations a target could not resolve."""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core import checks
from django.db import models

from .. import registry
from .messages import _error, _warning

# E007 matches whole words of a field name (snake_case or camelCase, digits apart),
# so `pin`, `pwd_hash` and `user_credentials` are caught but `pinned`, `spinner`,
# `passenger` or `secretary` are not.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "passcode",
        "pass",
        "pwd",
        "pin",
        "secret",
        "secrets",
        "token",
        "tokens",
        "credential",
        "credentials",
        "creds",
        "otp",
        "totp",
        "hotp",
        "salt",
        "apikey",
        "privkey",
    }
)
# Two words that name a secret together (`api_key`, `privateKey`), though neither does alone.
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("private", "key"), ("access", "key"), ("signing", "key")}
)


def name_words(name: str) -> list[str]:
    """``pwd_hash`` -> [pwd, hash]; ``apiKey2`` -> [api, key, 2]."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.findall(r"[a-z]+|[0-9]+", name.lower())


def looks_secret(name: str) -> bool:
    """Whether a field name looks like a password, PIN, token, key or credentials."""
    words = name_words(name)
    return any(w in _SECRET_WORDS for w in words) or any(
        pair in _SECRET_PAIRS for pair in zip(words, words[1:])
    )


def _label_lower(model: Any) -> str:
    meta = getattr(model, "_meta", None)
    return str(meta.label_lower) if meta is not None else str(model).lower()


@checks.register()
def check_registered_models(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    user_label = str(getattr(settings, "AUTH_USER_MODEL", "auth.User")).lower()
    for options in registry.all_options():
        errors += _model_problems(options, user_label)
        key_ok = True
        for path in options.natural_key:
            found, path_ok = _key_path_problems(options, path)
            errors += found
            key_ok = key_ok and path_ok
        if key_ok and not registry.identifies_rows(options.model, options.natural_key):
            errors.append(
                _error(
                    f"{options.model._meta.label}: natural key {list(options.natural_key)} "
                    "is not unique together.",
                    "Add unique=True, unique_together or a UniqueConstraint on the fields it starts "
                    "from (and on the related models' key fields).",
                    options.model,
                    "E003",
                )
            )
        errors += _field_list_problems(options)
        for f in (*options.concrete_fields, *options.m2m_fields):
            errors += _field_problems(options, f, user_label)
    return errors


def _model_problems(options: Any, user_label: str) -> list[checks.CheckMessage]:
    """Models that must never be synced, or cannot be."""
    model = options.model
    label = model._meta.label
    errors: list[checks.CheckMessage] = []
    if model._meta.label_lower == user_label or model._meta.app_label in (
        "auth",
        "sessions",
        "admin",
        "changefeed_sync",
    ):
        errors.append(
            _error(
                f"{label} must not be synced: it holds accounts, sessions or sync state.",
                "Sync reference data and content only; never users or credentials.",
                model,
                "E006",
            )
        )
    if model._meta.parents:
        errors.append(
            _error(
                f"{label} uses multi-table inheritance, which changefeed_sync does not sync.",
                "Register a model whose fields live in one table.",
                model,
                "E010",
            )
        )
    return errors


def _key_path_problems(options: Any, path: str) -> tuple[list[checks.CheckMessage], bool]:
    """What is wrong with one natural key path, and whether it resolves to a field."""
    model = options.model
    label = model._meta.label
    try:
        chain = registry.resolve_path(model, path)
    except LookupError as exc:
        return [_error(f"{label}: {exc}.", "Fix the natural_key path.", model, "E002")], False
    errors: list[checks.CheckMessage] = []
    ok = True
    if chain[-1].is_relation:
        ok = False
        errors.append(
            _error(
                f"{label}: natural key path {path!r} ends at a relation.",
                f"Name the related model's key fields, e.g. '{path}.code'.",
                model,
                "E002",
            )
        )
    nullable = [f.name for f in chain if f.null]
    if nullable:
        errors.append(
            _warning(
                f"{label}: natural key path {path!r} goes through nullable "
                f"field(s) {', '.join(nullable)}: a row whose key part is NULL "
                "can never be looked up on the target (NULL matches nothing).",
                "Make the natural key's fields NOT NULL, or choose other key fields.",
                model,
                "W003",
            )
        )
    for f in chain[:-1]:
        if registry.get_options(f.related_model) is None:  # type: ignore[arg-type]
            errors.append(
                _error(
                    f"{label}: natural key path {path!r} goes through "
                    f"{f.related_model._meta.label}, which is not registered.",  # type: ignore[union-attr]
                    "Register that model too, so its rows exist on the target.",
                    model,
                    "E004",
                )
            )
    return errors, ok


def _field_list_problems(options: Any) -> list[checks.CheckMessage]:
    """fields=, exclude= and file_fields= naming what is not a (file) field."""
    model = options.model
    label = model._meta.label
    errors: list[checks.CheckMessage] = []
    known = {f.name for f in model._meta.get_fields() if f.concrete or f.many_to_many}
    for arg in ("fields", "exclude", "file_fields"):
        for name in getattr(options, arg) or ():
            if name not in known:
                errors.append(
                    _error(
                        f"{label}: {arg} names {name!r}, which is not a field of the model.",
                        None,
                        model,
                        "E005",
                    )
                )
    for name in options.file_fields:
        if name in known and not isinstance(model._meta.get_field(name), models.FileField):
            errors.append(
                _error(
                    f"{label}: file_fields names {name!r}, which is not a FileField.",
                    None,
                    model,
                    "E009",
                )
            )
    return errors


def _field_problems(options: Any, f: Any, user_label: str) -> list[checks.CheckMessage]:
    """One synced field: a secret, a user, or a relation the target cannot resolve."""
    model = options.model
    label = model._meta.label
    errors: list[checks.CheckMessage] = []
    if looks_secret(f.name):
        errors.append(
            _error(
                f"{label}.{f.name} looks like a password, token or secret and would be synced.",
                f"Add exclude=['{f.name}'] (or leave it out of fields=).",
                model,
                "E007",
            )
        )
    if not f.is_relation:
        return errors
    related = f.related_model
    if _label_lower(related) == user_label:
        errors.append(
            _warning(
                f"{label}.{f.name} points at the user model {related._meta.label}: "
                "every event of the model would carry a username.",
                f"Add exclude=['{f.name}'] (or leave it out of fields=) unless the other "
                "site's users are meant to be named in your data.",
                model,
                "W002",
            )
        )
    if registry.get_options(related) is None and not (
        hasattr(related, "natural_key")
        and hasattr(related._default_manager, "get_by_natural_key")
    ):
        errors.append(
            _error(
                f"{label}.{f.name} points at {related._meta.label}, which is neither "
                "registered nor has natural_key()/get_by_natural_key().",
                f"Register {related._meta.label} or exclude the field.",
                model,
                "E008",
            )
        )
    return errors
