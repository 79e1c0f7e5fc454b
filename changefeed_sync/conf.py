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
    # How often a long-poll looks for new events written by other processes.
    "FEED_POLL_INTERVAL": 0.02,
    # Database alias whose outbox the feed serves.
    "FEED_DATABASE": "default",
    # Seconds a signed request stays valid; also how long nonces are kept.
    "SIGNATURE_MAX_AGE": 60,
    # Days of outbox kept by `changefeed_prune`; a target further behind needs a full pull.
    "RETENTION_DAYS": 30.0,
    # Target side --------------------------------------------------------
    # Events asked for per feed request by `changefeed_sync SOURCE`.
    "BATCH_SIZE": 1000,
    # Long-poll wait asked for by `changefeed_sync SOURCE --follow`.
    "FOLLOW_WAIT": 25.0,
    # Seconds to wait for a source's answer, on top of the long-poll wait.
    "REQUEST_TIMEOUT": 30.0,
    # Backoff bounds when a followed source is unreachable.
    "RETRY_MIN_DELAY": 0.5,
    "RETRY_MAX_DELAY": 60.0,
}


def get(name: str) -> Any:
    return getattr(settings, f"CHANGEFEED_SYNC_{name}", DEFAULTS[name])


def feed_max_limit() -> int:
    return int(get("FEED_MAX_LIMIT"))


def feed_default_limit() -> int:
    return int(get("FEED_DEFAULT_LIMIT"))


def feed_max_wait() -> float:
    return float(get("FEED_MAX_WAIT"))


def feed_poll_interval() -> float:
    return float(get("FEED_POLL_INTERVAL"))


def feed_database() -> str:
    return str(get("FEED_DATABASE"))


def signature_max_age() -> int:
    return int(get("SIGNATURE_MAX_AGE"))


def retention_days() -> float:
    return float(get("RETENTION_DAYS"))


def batch_size() -> int:
    return int(get("BATCH_SIZE"))


def follow_wait() -> float:
    return float(get("FOLLOW_WAIT"))


def request_timeout() -> float:
    return float(get("REQUEST_TIMEOUT"))


def retry_min_delay() -> float:
    return float(get("RETRY_MIN_DELAY"))


def retry_max_delay() -> float:
    return float(get("RETRY_MAX_DELAY"))
