"""Pulling a source's feed into this site: catch up once, or follow it.

Each page is applied with its checkpoint in one transaction (apply.py), so
stopping anywhere (SIGTERM, a crash, the source going away) loses nothing
and applies nothing twice: the next run starts from the stored checkpoint.
The contents of the files a page references come with it (increment_files.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from django.db import InterfaceError, OperationalError, close_old_connections
from django.utils import timezone

from . import conf
from .apply import ApplyStats
from .client import SourceClient
from .exceptions import ConfigurationError, CursorExpired, SourceReset
from .increment_files import apply_with_files
from .models import DataSource

logger = logging.getLogger("changefeed_sync.follow")

#: Errors that end even a follower: this site's configuration is unusable, or
#: only an operator can go on (a full Data Pull: the checkpoint expired, or the
#: source was reset or replaced). Everything else (the source away, answering
#: 401/403/5xx or something garbled, a page refused, this site's database
#: restarting) is recorded on the Data Source and retried with backoff.
FATAL: tuple[type[BaseException], ...] = (ConfigurationError, CursorExpired, SourceReset)


@dataclass
class SyncResult:
    pages: int = 0
    stats: ApplyStats = field(default_factory=ApplyStats)
    checkpoint: int = 0


def _record_error(source: DataSource, using: str, message: str) -> None:
    DataSource.objects.using(using).filter(pk=source.pk).update(
        last_error=message[:2000], last_error_at=timezone.now()
    )


def _record_safely(source: DataSource, using: str, message: str) -> None:
    """Record an error unless this site's database is what is failing."""
    try:
        _record_error(source, using, message)
    except (OperationalError, InterfaceError):
        close_old_connections()


def _transient(exc: BaseException) -> bool:
    """Conditions that usually pass by themselves (logged as warnings; the rest as errors)."""
    from .exceptions import SourceUnavailable

    return isinstance(exc, (SourceUnavailable, OperationalError, InterfaceError))


def check_source_id(source: DataSource, claimed: str | None, *, using: str) -> None:
    """SourceReset unless ``claimed`` (the identity a feed page or webhook carries) is
    the one the checkpoint belongs to (README, "Source identity").

    The first identity seen is recorded (a Data Source pulled or synced by an older
    version, or never synced): from then on only a full Data Pull changes it. A source
    that sends none (an older version) is not checked.
    """
    if claimed is None or claimed == source.source_id:
        return
    if not source.source_id:
        DataSource.objects.using(using).filter(pk=source.pk, source_id="").update(source_id=claimed)
    # Recorded meanwhile by a pull, a webhook or this update: read what is recorded.
    source.refresh_from_db(using=using, fields=["source_id", "checkpoint"])
    if claimed != source.source_id:
        raise SourceReset(
            source.name,
            f"it answers as {claimed!r}, the checkpoint {source.checkpoint} belongs to "
            f"{source.source_id!r}",
        )


class PageResult(NamedTuple):
    stats: ApplyStats | None
    #: More events are waiting at the source.
    more: bool
    #: Seconds the source asked us to wait before the next long-poll (0: none).
    retry_after: float = 0.0


def sync_page(
    source: DataSource,
    client: SourceClient,
    *,
    using: str,
    limit: int | None = None,
    wait: float = 0.0,
) -> PageResult:
    """Fetch and apply one page."""
    since = source.checkpoint
    page = client.fetch_feed(since, limit or conf.batch_size(), wait)
    check_source_id(source, page.source_id, using=using)
    if since != source.checkpoint:  # a pull moved it meanwhile: that page is not ours
        return PageResult(ApplyStats(), True)
    if not page.events and page.last_seq == since:
        return PageResult(ApplyStats(), page.more, page.retry_after)
    # File contents are fetched before the page's transaction, written inside it.
    stats = apply_with_files(
        source, client, page.events, since=since, last_seq=page.last_seq, using=using
    )
    if stats is None:
        # Someone else moved the checkpoint (a webhook, a pull): reload it and carry
        # on from there, with the identity it belongs to.
        source.refresh_from_db(using=using, fields=["checkpoint", "source_id"])
    return PageResult(stats, page.more)


def sync(
    source: DataSource,
    *,
    using: str | None = None,
    follow: bool = False,
    stop: threading.Event | None = None,
    limit: int | None = None,
    wait: float | None = None,
    client: SourceClient | None = None,
    on_page: Callable[[ApplyStats, DataSource], None] | None = None,
) -> SyncResult:
    """Apply the source's feed from the checkpoint until caught up (or, with
    ``follow``, until ``stop`` is set).

    Without ``follow``, any error is recorded on the Data Source and raised. With it,
    only ``FATAL`` errors end the loop; any other is recorded (``last_error``, shown
    in the admin and by ``changefeed_status``), logged, and retried with backoff
    (``CHANGEFEED_SYNC_RETRY_MIN_DELAY`` doubling up to ``_MAX_DELAY``)."""
    using = using or source._state.db or "default"
    stop = stop or threading.Event()
    client = client or SourceClient(source)
    result = SyncResult(checkpoint=source.checkpoint)
    delay = conf.retry_min_delay()
    long_poll = conf.follow_wait() if wait is None else wait
    more = True
    while not stop.is_set():
        try:
            stats, more, retry_after = sync_page(
                source, client, using=using, limit=limit, wait=0.0 if more else long_poll
            )
        except FATAL as exc:
            _record_error(source, using, str(exc))
            raise
        except Exception as exc:
            # Nothing of a page that failed was kept, its checkpoint included, so
            # retrying loses nothing and applies nothing twice.
            if not follow:
                _record_safely(source, using, str(exc))
                raise
            if isinstance(exc, (OperationalError, InterfaceError)):
                close_old_connections()
            _record_safely(source, using, str(exc))
            log = logger.warning if _transient(exc) else logger.error
            log("source %s: %s; retrying in %.1f s", source.name, exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, conf.retry_max_delay())
            continue
        if delay != conf.retry_min_delay():
            logger.info("source %s reachable again", source.name)
            delay = conf.retry_min_delay()
        result.checkpoint = source.checkpoint
        if stats is not None and stats.events:
            result.pages += 1
            result.stats.add(stats)
            logger.info(
                "source %s: applied %d events, checkpoint %d",
                source.name,
                stats.events,
                source.checkpoint,
            )
            if on_page is not None:
                on_page(stats, source)
        if not more and not follow:
            break
        if retry_after and not more:
            # The source had no room to hold our long-poll (a WSGI server's bound) and
            # answered at once: asking again at once would be a busy loop.
            stop.wait(retry_after)
    return result
