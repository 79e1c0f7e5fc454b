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
from contextlib import closing
from dataclasses import dataclass, field
from typing import NamedTuple

from django.db import InterfaceError, OperationalError, close_old_connections
from django.utils import timezone

from .. import conf
from ..exceptions import ConfigurationError, CursorExpired, SourceReset
from ..models import DataSource
from .apply import ApplyStats
from .client import FetchedPage, SourceClient
from .increment_files import apply_with_files

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
    from ..exceptions import SourceUnavailable

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


def apply_fetched(
    source: DataSource, client: SourceClient, page: FetchedPage, *, using: str
) -> ApplyStats | None:
    """Apply one fetched page, alone or a stream's: its identity checked first, then its
    events and the checkpoint (``page.since`` -> ``page.last_seq``) in one transaction.

    None, with nothing applied, when the checkpoint is no longer ``page.since``:
    someone else moved it meanwhile (a webhook, a pull); ``source`` is reloaded, with
    the identity the new checkpoint belongs to, so the caller goes on from there.
    """
    check_source_id(source, page.source_id, using=using)  # may reload the checkpoint
    if page.since != source.checkpoint:  # a pull moved it meanwhile: the page is not ours
        return None
    if not page.events and page.last_seq == page.since:
        return ApplyStats()
    # File contents are fetched before the page's transaction, written inside it.
    stats = apply_with_files(
        source, client, page.events, since=page.since, last_seq=page.last_seq, using=using
    )
    if stats is None:
        source.refresh_from_db(using=using, fields=["checkpoint", "source_id"])
    return stats


def sync_page(
    source: DataSource,
    client: SourceClient,
    *,
    using: str,
    limit: int | None = None,
    wait: float = 0.0,
) -> PageResult:
    """Fetch and apply one page."""
    page = client.fetch_feed(source.checkpoint, limit or conf.batch_size(), wait)
    stats = apply_fetched(source, client, page, using=using)
    if stats is None:  # the checkpoint moved meanwhile: ask again at once from there
        return PageResult(None, True)
    # A source that had no room to hold a long-poll answers an empty page at once.
    return PageResult(stats, page.more, 0.0 if page.events else page.retry_after)


def follow_stream(
    source: DataSource,
    client: SourceClient,
    *,
    using: str,
    limit: int | None = None,
    wait: float,
    stop: threading.Event,
    applied: Callable[[ApplyStats], None],
) -> PageResult:
    """Follow the source's streamed feed from the checkpoint (``stream=1``): each page
    applied as sync_page applies one, as it arrives, and passed to ``applied``; until
    the stream ends, ``stop`` is set (checked between lines: heartbeats come every few
    seconds) or someone else moves the checkpoint. What it returns says what to do
    next, as sync_page's answer does (its stats are None: ``applied`` had them)."""
    pages = client.stream_feed(source.checkpoint, limit or conf.batch_size(), wait)
    last = None
    with closing(pages):  # leaving early closes the connection
        for page in pages:
            stats = apply_fetched(source, client, page, using=using)
            if stats is None:
                # The checkpoint moved under the stream (a webhook or a pull applied
                # something): its next pages do not follow the stored checkpoint.
                # Start again from there, at once.
                return PageResult(None, False)
            applied(stats)
            last = page
            if stop.is_set():
                break
    if last is None:  # a stream with no line at all: ask again, as after any end
        return PageResult(None, False)
    # The end of the stream (or stop): ask again at once from the new checkpoint, or
    # when the source said (one page from a WSGI source that had no room to wait).
    return PageResult(None, last.more, 0.0 if last.events else last.retry_after)


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

    Following, once caught up, reads the source's streamed feed (one request, pages
    as they commit) unless CHANGEFEED_SYNC_FOLLOW_STREAM is False, then long-polls
    page by page; catching up reads plain pages.

    Without ``follow``, any error is recorded on the Data Source and raised. With it,
    only ``FATAL`` errors end the loop; any other is recorded (``last_error``, shown
    in the admin and by ``changefeed_status``), logged, and retried with backoff
    (``CHANGEFEED_SYNC_RETRY_MIN_DELAY`` doubling up to ``_MAX_DELAY``)."""
    using = using or source._state.db or "default"
    stop = stop or threading.Event()
    client = client or SourceClient(source)
    progress = _Progress(source, on_page)
    long_poll = conf.follow_wait() if wait is None else wait
    stream = follow and conf.follow_stream()
    more = True
    while not stop.is_set():
        try:
            if stream and not more:
                # Caught up: pages as they commit, on one request.
                _, more, retry_after = follow_stream(
                    source, client, using=using, limit=limit, wait=long_poll, stop=stop,
                    applied=progress.applied,
                )  # fmt: skip
            else:
                stats, more, retry_after = sync_page(
                    source, client, using=using, limit=limit, wait=0.0 if more else long_poll
                )
                progress.applied(stats)
        except FATAL as exc:
            _record_error(source, using, str(exc))
            raise
        except Exception as exc:
            # Nothing of a page that failed was kept, its checkpoint included, so
            # retrying loses nothing and applies nothing twice (a stream's pages
            # before it stay applied, each with its checkpoint).
            if not follow:
                _record_safely(source, using, str(exc))
                raise
            stop.wait(progress.failed(exc, using))
            continue
        progress.result.checkpoint = source.checkpoint
        if not more and not follow:
            break
        if retry_after and not more:
            # The source had no room to hold our long-poll (a WSGI server's bound) and
            # answered at once: asking again at once would be a busy loop.
            stop.wait(retry_after)
    return progress.result


class _Progress:
    """What one ``sync`` applied, and its backoff after failures."""

    def __init__(
        self, source: DataSource, on_page: Callable[[ApplyStats, DataSource], None] | None
    ) -> None:
        self.source = source
        self.on_page = on_page
        self.result = SyncResult(checkpoint=source.checkpoint)
        self.delay = conf.retry_min_delay()

    def applied(self, stats: ApplyStats | None) -> None:
        """One page (or a stream's line) came and was applied: record it."""
        source = self.source
        if self.delay != conf.retry_min_delay():
            logger.info("source %s reachable again", source.name)
            self.delay = conf.retry_min_delay()
        self.result.checkpoint = source.checkpoint
        if stats is not None and stats.events:
            self.result.pages += 1
            self.result.stats.add(stats)
            logger.info(
                "source %s: applied %d events, checkpoint %d",
                source.name,
                stats.events,
                source.checkpoint,
            )
            if self.on_page is not None:
                self.on_page(stats, source)

    def failed(self, exc: Exception, using: str) -> float:
        """Record and log a failure while following; seconds to wait before retrying
        (``CHANGEFEED_SYNC_RETRY_MIN_DELAY`` doubling up to ``_MAX_DELAY``)."""
        if isinstance(exc, (OperationalError, InterfaceError)):
            close_old_connections()
        _record_safely(self.source, using, str(exc))
        delay = self.delay
        log = logger.warning if _transient(exc) else logger.error
        log("source %s: %s; retrying in %.1f s", self.source.name, exc, delay)
        self.delay = min(delay * 2, conf.retry_max_delay())
        return delay
