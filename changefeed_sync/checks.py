"""System checks: registration and settings mistakes found at start-up, not at sync time.

Ids are stable; the README lists them.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core import checks
from django.db import models

from . import conf, registry

_SECRET_NAME = re.compile(r"(pass(word|wd)?|secret|token|api_?key|private_?key|otp|salt)", re.I)


def _error(msg: str, hint: str | None, obj: Any, id: str) -> checks.Error:
    return checks.Error(msg, hint=hint, obj=obj, id=f"changefeed_sync.{id}")


@checks.register()
def check_registered_models(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    user_label = str(getattr(settings, "AUTH_USER_MODEL", "auth.User")).lower()
    for options in registry.all_options():
        model = options.model
        label = model._meta.label
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
        # Natural key paths.
        key_ok = True
        for path in options.natural_key:
            try:
                chain = registry.resolve_path(model, path)
            except LookupError as exc:
                key_ok = False
                errors.append(
                    _error(f"{label}: {exc}.", "Fix the natural_key path.", model, "E002")
                )
                continue
            if chain[-1].is_relation:
                key_ok = False
                errors.append(
                    _error(
                        f"{label}: natural key path {path!r} ends at a relation.",
                        f"Name the related model's key fields, e.g. '{path}.code'.",
                        model,
                        "E002",
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
        if key_ok and not registry.identifies_rows(model, options.natural_key):
            errors.append(
                _error(
                    f"{label}: natural key {list(options.natural_key)} is not unique together.",
                    "Add unique=True, unique_together or a UniqueConstraint on the fields it starts "
                    "from (and on the related models' key fields).",
                    model,
                    "E003",
                )
            )
        # Field lists.
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
        for f in (*options.concrete_fields, *options.m2m_fields):
            if _SECRET_NAME.search(f.name):
                errors.append(
                    _error(
                        f"{label}.{f.name} looks like a password, token or secret and would be synced.",
                        f"Add exclude=['{f.name}'] (or leave it out of fields=).",
                        model,
                        "E007",
                    )
                )
            if f.is_relation:
                related = f.related_model
                if registry.get_options(related) is None and not (  # type: ignore[arg-type]
                    hasattr(related, "natural_key")
                    and hasattr(related._default_manager, "get_by_natural_key")  # type: ignore[union-attr]
                ):
                    errors.append(
                        _error(
                            f"{label}.{f.name} points at {related._meta.label}, which is neither "  # type: ignore[union-attr]
                            "registered nor has natural_key()/get_by_natural_key().",
                            f"Register {related._meta.label} or exclude the field.",  # type: ignore[union-attr]
                            model,
                            "E008",
                        )
                    )
    return errors


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for name, default in conf.DEFAULTS.items():
        value = conf.get(name)
        if name == "DELIVERY_BACKEND" and value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int | float):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, type(default))
        if not ok:
            errors.append(
                _error(
                    f"CHANGEFEED_SYNC_{name} must be a {type(default).__name__} >= 0, got {value!r}.",
                    f"The default is {default!r}.",
                    None,
                    "E101",
                )
            )
    if (
        isinstance(conf.get("FEED_DATABASE"), str)
        and conf.get("FEED_DATABASE") not in settings.DATABASES
    ):
        errors.append(
            _error(
                f"CHANGEFEED_SYNC_FEED_DATABASE is {conf.get('FEED_DATABASE')!r}, not a DATABASES alias.",
                None,
                None,
                "E102",
            )
        )
    return errors


@checks.register()
def check_delivery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.utils.module_loading import import_string

    path = conf.delivery_backend()
    if not path:
        return []
    try:
        backend = import_string(path)
    except ImportError as exc:
        return [
            _error(
                f"CHANGEFEED_SYNC_DELIVERY_BACKEND {path!r} cannot be imported: {exc}.",
                "Cloud Tasks needs `pip install changefeed-sync[cloudtasks]`.",
                None,
                "E103",
            )
        ]
    problems = getattr(backend, "configuration_problems", None)
    return [_error(p, None, None, "E104") for p in (problems() if problems else [])]


@checks.register()
def check_sqlite_transaction_mode(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """SQLite fails a transaction that reads, then writes, at once ("database is
    locked") when another process wrote in between; a source writes on every
    feed request and delivery, so several processes on one SQLite file need
    transactions that take the write lock when they begin."""
    import django

    if django.VERSION < (5, 1):
        return []
    warnings: list[checks.CheckMessage] = []
    for alias, config in settings.DATABASES.items():
        if not str(config.get("ENGINE", "")).endswith("sqlite3"):
            continue
        if config.get("OPTIONS", {}).get("transaction_mode") != "IMMEDIATE":
            warnings.append(
                checks.Warning(
                    f"Database {alias!r} is SQLite without "
                    "OPTIONS['transaction_mode'] = 'IMMEDIATE'.",
                    hint="With more than one process (a server and changefeed_sync --follow, "
                    "or several workers) set it, or transactions that read then write may fail "
                    "with 'database is locked'.",
                    id="changefeed_sync.W001",
                )
            )
    return warnings
