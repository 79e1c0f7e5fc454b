"""Settings, read lazily so that ``override_settings`` just works.

Every setting is a ``CHANGEFEED_SYNC_*`` name in the project's settings; the
defaults live here and nowhere else. Nothing is read at import time and
nothing is written back to ``settings``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Source side --------------------------------------------------------
    # Most events one feed page may carry, whatever the client asks for.
    "FEED_MAX_LIMIT": 5000,
    # Page size when the client does not ask for one (CouchDB's replicator uses 500).
    "FEED_DEFAULT_LIMIT": 1000,
    # Longest long-poll wait a client may ask for, in seconds.
    "FEED_MAX_WAIT": 30.0,
    # How often a process's notifier asks for the feed's head while long-polls wait
    # (one query per process and interval, whatever the number of waiting followers).
    "FEED_POLL_INTERVAL": 0.02,
    # Long-polls waiting at once per process under WSGI, where each holds a server
    # thread; more are answered at once with FEED_WSGI_RETRY_AFTER. (None on a WSGI
    # server that runs one request at a time per process; no bound under ASGI.)
    "FEED_WSGI_WAITERS": 2,
    # Seconds a follower refused a wait under WSGI is told to sleep before asking again.
    "FEED_WSGI_RETRY_AFTER": 1.0,
    # Database alias whose outbox the feed serves.
    "FEED_DATABASE": "default",
    # Seconds a signed request stays valid; also how long nonces are kept.
    "SIGNATURE_MAX_AGE": 60,
    # Days of outbox kept by `changefeed_prune`; a target further behind needs a full pull.
    "RETENTION_DAYS": 30.0,
    # Push: dotted path of the delivery backend; None disables pushing.
    "DELIVERY_BACKEND": "changefeed_sync.source.delivery.inline.InlineBackend",
    # Seconds after each consecutive failure before the next attempt (Svix's schedule).
    "DELIVERY_RETRY_DELAYS": [0, 5, 300, 1800, 7200, 18000, 36000, 36000],
    # Largest webhook body sent; a bigger batch is split (Cloud Tasks advises < 100 KB).
    "DELIVERY_MAX_BYTES": 90_000,
    "DELIVERY_TIMEOUT": 30.0,
    # Cloud Tasks backend (django-data-sync's DATA_SYNC_* settings have equivalents here).
    "CLOUD_TASKS_PROJECT": "",
    "CLOUD_TASKS_LOCATION": "europe-west1",
    "CLOUD_TASKS_QUEUE": "changefeed-sync",
    "CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL": "",
    # host:port of gcloud-tasks-emulator, for development and tests.
    "CLOUD_TASKS_EMULATOR_HOST": "",
    # PostgreSQL: prepare the one statement an autocommit save is sent as
    # (None: unless DISABLE_SERVER_SIDE_CURSORS or server_side_binding is set).
    "PREPARE_STATEMENTS": None,
    # Target side: webhooks ----------------------------------------------
    # Database alias holding the Data Sources that webhooks are applied to.
    "TARGET_DATABASE": "default",
    # Seconds a webhook signature stays valid (Standard Webhooks: 5 minutes).
    "WEBHOOK_TOLERANCE": 300,
    "WEBHOOK_MAX_BYTES": 1_000_000,
    # Where Google's OIDC signing certificates are fetched (cached for an hour).
    "OIDC_CERTS_URL": "https://www.googleapis.com/oauth2/v1/certs",
    # Target side --------------------------------------------------------
    # Events asked for per feed request by `changefeed_sync SOURCE`.
    "BATCH_SIZE": 1000,
    # Long-poll wait asked for by `changefeed_sync SOURCE --follow`.
    "FOLLOW_WAIT": 25.0,
    # Follow a caught-up source's streamed feed (one request, pages as they commit);
    # False: long-poll page by page, for proxies that hold a response back until it ends.
    "FOLLOW_STREAM": True,
    # Seconds to wait for a source's answer, on top of the long-poll wait; in a
    # streamed feed, the longest silence between lines (heartbeats come every 5 s).
    "REQUEST_TIMEOUT": 30.0,
    # Backoff bounds when a followed source is unreachable.
    "RETRY_MIN_DELAY": 0.5,
    "RETRY_MAX_DELAY": 60.0,
    # Full Data Pull: rows asked for per snapshot request (the source caps it at
    # its FEED_MAX_LIMIT).
    "PULL_PAGE_SIZE": 5000,
    # Seconds without a heartbeat after which a running pull counts as dead.
    "PULL_STALE_AFTER": 120.0,
    # Largest file a pull or an increment downloads, in bytes.
    "MAX_FILE_SIZE": 100 * 1024 * 1024,
    # Seconds a webhook spends downloading the files its batch references before
    # answering 503 files_pending (the sender's timeout is 30 s).
    "WEBHOOK_FILES_SECONDS": 20.0,
    # Inline push: delivery threads per process, whatever the number of targets.
    "DELIVERY_WORKERS": 4,
    # Seconds a process that exits waits for the inline deliveries it started.
    "DELIVERY_EXIT_WAIT": 5.0,
}


_read: dict[str, Any] = {}


def get(name: str) -> Any:
    """The raw value of ``CHANGEFEED_SYNC_<name>``, or its default; the system
    checks (checks/configuration.py) validate it, the accessors below convert it.

    Read once, then kept until a setting changes (``setting_changed``, which
    ``override_settings`` sends): a save reads several settings, and asking
    Django's lazy settings for one that is not set costs an exception each time
    (about 20 µs, a tenth of what capture adds to a save).
    """
    try:
        return _read[name]
    except KeyError:
        value = _read[name] = getattr(settings, f"CHANGEFEED_SYNC_{name}", DEFAULTS[name])
        return value


def forget(**kwargs: Any) -> None:
    """``setting_changed`` receiver (connected in ``AppConfig.ready``): read again."""
    _read.clear()


def delivery_workers() -> int:
    return int(get("DELIVERY_WORKERS"))


def delivery_exit_wait() -> float:
    return float(get("DELIVERY_EXIT_WAIT"))


def feed_max_limit() -> int:
    return int(get("FEED_MAX_LIMIT"))


def feed_default_limit() -> int:
    return int(get("FEED_DEFAULT_LIMIT"))


def feed_max_wait() -> float:
    return float(get("FEED_MAX_WAIT"))


def feed_poll_interval() -> float:
    return float(get("FEED_POLL_INTERVAL"))


def feed_wsgi_waiters() -> int:
    return int(get("FEED_WSGI_WAITERS"))


def feed_wsgi_retry_after() -> float:
    return float(get("FEED_WSGI_RETRY_AFTER"))


def feed_database() -> str:
    return str(get("FEED_DATABASE"))


def signature_max_age() -> int:
    return int(get("SIGNATURE_MAX_AGE"))


def retention_days() -> float:
    return float(get("RETENTION_DAYS"))


#: Where the delivery backends lived before the source side got its own package:
#: settings written then keep working.
OLD_DELIVERY_PACKAGE = "changefeed_sync.delivery."
DELIVERY_PACKAGE = "changefeed_sync.source.delivery."


def delivery_backend() -> str | None:
    value = get("DELIVERY_BACKEND")
    if not value:
        return None
    path = str(value)
    if path.startswith(OLD_DELIVERY_PACKAGE):
        path = DELIVERY_PACKAGE + path[len(OLD_DELIVERY_PACKAGE) :]
    return path


def delivery_retry_delays() -> list[float]:
    return [float(d) for d in get("DELIVERY_RETRY_DELAYS")]


def delivery_max_bytes() -> int:
    return int(get("DELIVERY_MAX_BYTES"))


def delivery_timeout() -> float:
    return float(get("DELIVERY_TIMEOUT"))


def cloud_tasks(name: str) -> str:
    return str(get(f"CLOUD_TASKS_{name}"))


def prepare_statements() -> bool | None:
    """None: decide per connection (see outbox_pg)."""
    value = get("PREPARE_STATEMENTS")
    return None if value is None else bool(value)


def target_database() -> str:
    return str(get("TARGET_DATABASE"))


def webhook_tolerance() -> int:
    return int(get("WEBHOOK_TOLERANCE"))


def webhook_max_bytes() -> int:
    return int(get("WEBHOOK_MAX_BYTES"))


def oidc_certs_url() -> str:
    return str(get("OIDC_CERTS_URL"))


def batch_size() -> int:
    return int(get("BATCH_SIZE"))


def follow_wait() -> float:
    return float(get("FOLLOW_WAIT"))


def follow_stream() -> bool:
    return bool(get("FOLLOW_STREAM"))


def request_timeout() -> float:
    return float(get("REQUEST_TIMEOUT"))


def retry_min_delay() -> float:
    return float(get("RETRY_MIN_DELAY"))


def retry_max_delay() -> float:
    return float(get("RETRY_MAX_DELAY"))


def pull_page_size() -> int:
    return int(get("PULL_PAGE_SIZE"))


def pull_stale_after() -> float:
    return float(get("PULL_STALE_AFTER"))


def max_file_size() -> int:
    return int(get("MAX_FILE_SIZE"))


def webhook_files_seconds() -> float:
    return float(get("WEBHOOK_FILES_SECONDS"))
