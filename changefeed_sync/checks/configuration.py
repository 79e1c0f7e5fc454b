"""Checks of the settings (one id per setting, as django-cors-headers does) and of
how the site is served (the delivery backend, SQLite's transaction mode, long-polls
under WSGI)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core import checks

from .. import conf
from .messages import _error, _warning

# --------------------------------------------------------------------------- settings
# One id per setting (as django-cors-headers does), so a message says which
# setting is wrong and one id can be silenced alone. E101, "a setting has the
# wrong type" for all of them, is retired. E102 and E103 keep their meaning and
# cover their setting's type too.


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _count_or_zero(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _positive_seconds(value: Any) -> bool:
    return _is_number(value) and value > 0


def _at_least_one_second(value: Any) -> bool:
    return _is_number(value) and value >= 1


def _string(value: Any) -> bool:
    return isinstance(value, str)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _optional_bool(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _delays(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) > 0 and all(_seconds(d) for d in value)


def _http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _alias(value: Any) -> bool:
    return isinstance(value, str) and value in settings.DATABASES


_COUNT = "a whole number >= 1"
_SECONDS = "a number of seconds >= 0"
_POSITIVE_SECONDS = "a number of seconds > 0"

#: Setting (without CHANGEFEED_SYNC_) -> (check id, test, what it must be).
#: DELIVERY_BACKEND is checked by check_delivery (E103, E104).
SETTING_CHECKS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "FEED_DATABASE": ("E102", _alias, "a DATABASES alias"),
    "FEED_MAX_LIMIT": ("E105", _count, _COUNT),
    "FEED_DEFAULT_LIMIT": ("E106", _count, _COUNT),
    "FEED_MAX_WAIT": ("E107", _seconds, _SECONDS),
    "FEED_POLL_INTERVAL": ("E108", _positive_seconds, _POSITIVE_SECONDS),
    "FEED_WSGI_WAITERS": ("E133", _count_or_zero, "a whole number >= 0"),
    "FEED_WSGI_RETRY_AFTER": ("E134", _positive_seconds, _POSITIVE_SECONDS),
    "SIGNATURE_MAX_AGE": ("E109", _at_least_one_second, "a number of seconds >= 1"),
    "RETENTION_DAYS": ("E110", _seconds, "a number of days >= 0"),
    "DELIVERY_RETRY_DELAYS": (
        "E111",
        _delays,
        "a non-empty list or tuple of numbers of seconds >= 0",
    ),
    "DELIVERY_MAX_BYTES": ("E112", _count, _COUNT),
    "DELIVERY_TIMEOUT": ("E113", _positive_seconds, _POSITIVE_SECONDS),
    "CLOUD_TASKS_PROJECT": ("E114", _string, "a string"),
    "CLOUD_TASKS_LOCATION": ("E115", _string, "a string"),
    "CLOUD_TASKS_QUEUE": ("E116", _string, "a string"),
    "CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL": ("E117", _string, "a string"),
    "CLOUD_TASKS_EMULATOR_HOST": ("E118", _string, "a string ('host:port' or empty)"),
    "PREPARE_STATEMENTS": ("E119", _optional_bool, "True, False or None"),
    "TARGET_DATABASE": ("E120", _alias, "a DATABASES alias"),
    "WEBHOOK_TOLERANCE": ("E121", _at_least_one_second, "a number of seconds >= 1"),
    "WEBHOOK_MAX_BYTES": ("E122", _count, _COUNT),
    "OIDC_CERTS_URL": ("E123", _http_url, "an http(s) URL"),
    "BATCH_SIZE": ("E124", _count, _COUNT),
    "FOLLOW_WAIT": ("E125", _seconds, _SECONDS),
    "FOLLOW_STREAM": ("E137", _bool, "True or False"),
    "REQUEST_TIMEOUT": ("E126", _positive_seconds, _POSITIVE_SECONDS),
    "RETRY_MIN_DELAY": ("E127", _seconds, _SECONDS),
    "RETRY_MAX_DELAY": ("E128", _positive_seconds, _POSITIVE_SECONDS),
    "PULL_PAGE_SIZE": ("E129", _count, _COUNT),
    "PULL_STALE_AFTER": ("E130", _positive_seconds, _POSITIVE_SECONDS),
    "MAX_FILE_SIZE": ("E131", _count, "a number of bytes >= 1"),
    "WEBHOOK_FILES_SECONDS": ("E132", _seconds, _SECONDS),
    "DELIVERY_WORKERS": ("E135", _count, _COUNT),
    "DELIVERY_EXIT_WAIT": ("E136", _seconds, _SECONDS),
}


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for name, (id, valid, expected) in SETTING_CHECKS.items():
        value = conf.get(name)
        if not valid(value):
            errors.append(
                _error(
                    f"CHANGEFEED_SYNC_{name} must be {expected}, got {value!r}.",
                    f"The default is {conf.DEFAULTS[name]!r}.",
                    None,
                    id,
                )
            )
    low, high = conf.get("RETRY_MIN_DELAY"), conf.get("RETRY_MAX_DELAY")
    if _seconds(low) and _positive_seconds(high) and high < low:
        errors.append(
            _error(
                f"CHANGEFEED_SYNC_RETRY_MAX_DELAY ({high!r}) is below "
                f"CHANGEFEED_SYNC_RETRY_MIN_DELAY ({low!r}).",
                "The backoff of a follower grows from the minimum to the maximum.",
                None,
                SETTING_CHECKS["RETRY_MAX_DELAY"][0],
            )
        )
    return errors


@checks.register()
def check_delivery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.utils.module_loading import import_string

    path = conf.get("DELIVERY_BACKEND")
    if not path:  # None (or another false value, as conf.delivery_backend reads it)
        return []
    if not isinstance(path, str):
        return [
            _error(
                f"CHANGEFEED_SYNC_DELIVERY_BACKEND must be a dotted path or None, got {path!r}.",
                f"The default is {conf.DEFAULTS['DELIVERY_BACKEND']!r}.",
                None,
                "E103",
            )
        ]
    try:
        backend = import_string(conf.delivery_backend() or path)
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


#: Above this many long-polls waiting at once per WSGI process, W004 warns.
WSGI_WAITERS_WARN = 4


@checks.register()
def check_wsgi_long_polls(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Under WSGI every waiting long-poll holds a server thread that no page can use
    (50 waiting followers stopped a 3-worker gunicorn site), so waits there are bounded
    per process. A bound above a few threads gives them back to the followers; whether
    the site runs under WSGI at all cannot be told from here, hence a warning."""
    waiters, max_wait = conf.get("FEED_WSGI_WAITERS"), conf.get("FEED_MAX_WAIT")
    if not (_count_or_zero(waiters) and _seconds(max_wait)):
        return []  # E133 / E107 say what is wrong
    if waiters <= WSGI_WAITERS_WARN or max_wait == 0:
        return []
    return [
        _warning(
            f"CHANGEFEED_SYNC_FEED_WSGI_WAITERS is {waiters}: under WSGI, up to {waiters} "
            "threads of each server process can be held by followers' long-polls, each "
            f"for up to CHANGEFEED_SYNC_FEED_MAX_WAIT ({max_wait!r} s), and a held thread "
            "serves no page (a gunicorn sync worker has one thread, a gthread worker a few).",
            "Serve the feed under ASGI (uvicorn, or gunicorn with uvicorn workers), where a "
            "waiting follower holds no thread, or keep this setting at "
            f"{WSGI_WAITERS_WARN} or below, well under your threads per process; see the "
            "README's 'Deploying' section. Silence changefeed_sync.W004 if every WSGI "
            "process has many more threads than that.",
            None,
            "W004",
        )
    ]
