"""Reading the outbox after a cursor. No HTTP here: views.py wraps it.

Positions are event ids. ``outbox.lock`` makes ids visible in commit order,
so "every event with id > cursor, in id order" never skips a transaction
that commits late: reading is a plain indexed range scan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from . import conf, outbox
from .exceptions import CursorExpired
from .models import Event, OutboxState
from .serialization import PROTOCOL_VERSION

# Counting what is left is capped, so a far-behind reader costs no long scan.
PENDING_CAP = 10_000
_COLUMNS = ("id", "created_at", "model", "op", "key", "old_key", "data", "changed")


@dataclass
class FeedPage:
    events: list[dict[str, Any]]
    since: int
    last_seq: int
    more: bool
    pending: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "since": self.since,
            "last_seq": self.last_seq,
            "more": self.more,
            "pending": self.pending,
            "events": self.events,
        }


def pruned_through(using: str) -> int:
    state = OutboxState.objects.using(using).filter(id=1).values_list("pruned_through", flat=True)
    return next(iter(state), 0)


def read(
    since: int, limit: int, *, using: str | None = None, models: list[str] | None = None
) -> FeedPage:
    """Events with position > ``since``, oldest first, at most ``limit``.

    ``models`` limits the events to those labels (a Target's selection); the
    cursor still moves past the others.
    """
    using = using or conf.feed_database()
    if since < pruned_through(using):
        raise CursorExpired(
            f"cursor {since} is older than the oldest event kept "
            f"(pruned through {pruned_through(using)}): run a full Data Pull"
        )
    events = Event.objects.using(using).filter(id__gt=since)
    if models:
        events = events.filter(model__in=models)
    # Plain tuples, not model instances: this is the feed's hot path.
    rows = list(events.order_by("id").values_list(*_COLUMNS)[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1][0] if rows else since
    if more:
        pending = events.filter(id__gt=last)[:PENDING_CAP].count()
    else:
        pending = 0
    wire = [
        {
            "seq": seq,
            "ts": created_at.isoformat(),
            "model": model,
            "op": op,
            "key": key,
            "old_key": old_key,
            "data": data,
            "changed": changed,
        }
        for seq, created_at, model, op, key, old_key, data, changed in rows
    ]
    return FeedPage(wire, since, last, more, pending)


def has_events_after(since: int, using: str, models: list[str] | None = None) -> bool:
    events = Event.objects.using(using).filter(id__gt=since)
    if models:
        events = events.filter(model__in=models)
    return bool(events.exists())


def read_or_wait(
    since: int,
    limit: int,
    wait: float,
    *,
    using: str | None = None,
    models: list[str] | None = None,
) -> FeedPage:
    """Long-poll: return as soon as there is an event after ``since``, or after ``wait`` s."""
    using = using or conf.feed_database()
    deadline = time.monotonic() + max(0.0, wait)
    interval = conf.feed_poll_interval()
    while True:
        page = read(since, limit, using=using, models=models)
        remaining = deadline - time.monotonic()
        if page.events or remaining <= 0:
            return page
        # Woken at once by commits in this process, otherwise re-checked every interval.
        while remaining > 0:
            outbox.wait(min(interval, remaining))
            if has_events_after(since, using, models):
                break
            remaining = deadline - time.monotonic()
