"""Reading the outbox after a cursor. No HTTP here: views.py wraps it.

A cursor is a feed position (``Event.position``). Positions are given after
commit by ``sequencer.sequence``, gap-free and in order, so "every event with
position > cursor, in position order" never skips a transaction that commits
late: reading is a plain indexed range scan, after sequencing what committed.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import Q

from .. import conf
from ..exceptions import CursorAhead, CursorExpired, FilterChanged
from ..models import Event
from ..serialization import PROTOCOL_VERSION
from . import sequencer

# Counting what is left is capped, so a far-behind reader costs no long scan
# (counting 10,000 cost a catching-up reader more than reading its page).
PENDING_CAP = 1_000
_JSON_COLUMNS = ("key", "old_key", "data", "changed")


@dataclass
class FeedPage:
    """One page of the feed. ``events_json`` is the JSON array of the events
    as sent on the wire; ``events`` decodes it once, when asked for."""

    events_json: str
    since: int
    last_seq: int
    more: bool
    pending: int
    #: The source's identity (README, "Source identity"), sent when set.
    source_id: str | None = None

    @cached_property
    def events(self) -> list[dict[str, Any]]:
        decoded: list[dict[str, Any]] = json.loads(self.events_json)
        return decoded

    @property
    def has_events(self) -> bool:
        """Whether the page holds events, without decoding them: a page shared by many
        followers is only ever sent, and decoded events kept alive with it (for the
        seconds the long-poll cache keeps a page) made the server's garbage collector
        run full collections of 70 to 100 ms every second or two at 100 events/s."""
        return self.events_json != "[]"

    def header(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "since": self.since,
            "last_seq": self.last_seq,
            "more": self.more,
            "pending": self.pending,
        }
        if self.source_id is not None:
            header["source_id"] = self.source_id
        return header

    def to_json(self) -> str:
        """The wire document, with the events spliced in as stored (no re-encoding)."""
        head = json.dumps(self.header(), separators=(",", ":"))
        return head[:-1] + ',"events":' + self.events_json + "}"

    @cached_property
    def line(self) -> bytes:
        """The wire document as one line of a streamed feed, encoded once however many
        followers a shared page is sent to. Stored JSON has no raw line breaks but as
        whitespace (JSON strings escape theirs), so any there become spaces."""
        text = self.to_json()
        if "\n" in text or "\r" in text:
            text = text.replace("\r", " ").replace("\n", " ")
        return (text + "\n").encode()


def pruned_through(using: str) -> int:
    return sequencer.state(using).pruned_through


def head(using: str) -> int:
    """The last position this outbox gave out (after giving positions to every
    event committed so far). No reader's cursor can be beyond it."""
    return sequencer.head(using)


def check_cursor(since: int, using: str) -> sequencer.State:
    """The outbox's state, after checking that ``since`` is a position it can
    continue from: CursorExpired when older than what is kept, CursorAhead when
    beyond its head (the source was reset or replaced, or the cursor comes from
    another site)."""
    state = sequencer.state(using)
    if since < state.pruned_through:
        raise CursorExpired(
            f"cursor {since} is older than the oldest event kept "
            f"(pruned through {state.pruned_through}): run a full Data Pull"
        )
    if since > state.pruned_through:
        current = head(using)
        if since > current:
            raise CursorAhead(since, current)
    return state


@dataclass(frozen=True)
class Routed:
    """A filtered Target's part of the feed: events of the models its filters read
    (``labels``) reach it as their routes say for ``route_id`` (source/routes.py).
    Hashable: long-polls share pages per (position, models, Routed)."""

    route_id: str
    labels: frozenset[str]


def read(
    since: int,
    limit: int,
    *,
    using: str | None = None,
    models: list[str] | None = None,
    routed: Routed | None = None,
) -> FeedPage:
    """Events with position > ``since``, oldest first, at most ``limit``.

    ``models`` limits the events to those labels (a Target's selection, an empty
    list: none); the cursor still moves past the others. ``routed``: a filtered
    Target's reading (``Routed``): events of its filtered models that are nothing
    to it are left out, a row that left its filter comes as a delete, and an event
    routed without its current filters raises FilterChanged.
    """
    using = using or conf.feed_database()
    sequencer.sequence(using)
    if since < pruned_through(using):
        raise CursorExpired(
            f"cursor {since} is older than the oldest event kept "
            f"(pruned through {pruned_through(using)}): run a full Data Pull"
        )
    rows = _rows(since, limit + 1, using, models, routed)
    more = len(rows) > limit
    rows = rows[:limit]
    if routed is not None:
        rows = _as_routed(rows, routed)
    last = rows[-1][0] if rows else since
    if more:
        events = Event.objects.using(using).filter(position__gt=last)
        if models is not None:
            events = events.filter(model__in=models)
        if routed is not None:
            events = events.exclude(
                model__in=routed.labels, routes__contains=f",{routed.route_id}:-,"
            ).exclude(~Q(model__in=routed.labels), routes__startswith="*")
        else:
            events = events.exclude(routes__startswith="*")
        pending = events[:PENDING_CAP].count()
    else:
        pending = 0
    return FeedPage(_splice(rows, connections[using]), since, last, more, pending)


def _as_routed(rows: list[tuple[Any, ...]], routed: Routed) -> list[tuple[Any, ...]]:
    """Rows with their routes (last column) -> the rows one filtered Target receives."""
    out = []
    mark = f",{routed.route_id}:"
    for row in rows:
        *event, routes = row
        if event[2] in routed.labels:
            text = routes if isinstance(routes, str) or routes is None else _text(routes)
            at = -1 if text is None else text.find(mark)
            if text is None or at < 0:
                raise FilterChanged(
                    f"the event at position {event[0]} ({event[2]}) was routed without this "
                    "Target's current row filters (they were set or changed since, or the "
                    "event came through a relay that does not route): run a full Data Pull"
                )
            op = text[at + len(mark)]
            if op == "-":  # left out by the query already; never sent
                continue
            if op == "l":  # the row left the filter: the Target deletes what it holds
                key = event[5] if event[5] is not None else event[4]
                event = [event[0], event[1], event[2], "delete", key, None, None, None]
        out.append(tuple(event))
    return out


def _rows(
    since: int, count: int, using: str, models: list[str] | None, routed: Routed | None = None
) -> list[tuple[Any, ...]]:
    """(position, created_at, model, op, key, old_key, data, changed) with the JSON
    columns as the text the database holds (and ``routes`` last, when ``routed``).

    The feed's hot path: the stored JSON is valid JSON already, so it is
    passed through rather than decoded per column and encoded again (that
    cost more than everything else a page needs).
    """
    connection = connections[using]
    qn = connection.ops.quote_name
    cast = "::text" if connection.vendor == "postgresql" else ""
    created_at = qn("created_at")
    if connection.vendor == "sqlite":
        # An expression has no declared type, so the driver hands back the stored
        # text instead of parsing a datetime that is only formatted again.
        created_at += " || ''"
    columns = ", ".join(
        [qn("position"), created_at, qn("model"), qn("op")]
        + [f"{qn(c)}{cast}" for c in _JSON_COLUMNS]
        + ([qn("routes")] if routed is not None else [])
    )
    sql = f"SELECT {columns} FROM {qn(Event._meta.db_table)} WHERE {qn('position')} > %s"
    params: list[Any] = [since]
    if models is not None:
        if not models:
            return []
        sql += f" AND {qn('model')} IN ({', '.join(['%s'] * len(models))})"
        params.extend(models)
    routes = f"COALESCE({qn('routes')}, '')"
    if routed is not None and routed.labels:
        # Events that are nothing to this Target stay in the database; so do
        # route-only events (cascades.py) of models its filters do not read. NULL
        # routes (never routed) are read, so that read() can refuse them.
        labels = sorted(routed.labels)
        marks = ", ".join(["%s"] * len(labels))
        sql += (
            f" AND NOT ({qn('model')} IN ({marks}) AND {routes} LIKE %s)"
            f" AND ({routes} NOT LIKE %s OR {qn('model')} IN ({marks}))"
        )
        params.extend([*labels, f"%,{routed.route_id}:-,%", "*%", *labels])
    else:
        # Route-only events are for some filtered Targets only (cascades.py).
        sql += f" AND {routes} NOT LIKE %s"
        params.append("*%")
    sql += f" ORDER BY {qn('position')} LIMIT {int(count)}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
    return rows


def _timestamps(values: list[Any], connection: Any) -> list[str]:
    """``created_at`` values as ISO 8601 with their offset, whatever the driver returned."""
    aware = settings.USE_TZ
    # Where the database keeps no offset, Django stores UTC, or the database's
    # TIME_ZONE setting when it has one.
    utc = connection.timezone_name == "UTC"
    out = []
    for value in values:
        if isinstance(value, str):
            if utc or not aware:
                # SQLite keeps text: "YYYY-MM-DD HH:MM:SS[.ffffff]", isoformat's digits.
                out.append(value.replace(" ", "T") + ("+00:00" if aware else ""))
                continue
            value = datetime.datetime.fromisoformat(value)
        if aware and value.tzinfo is None:
            value = value.replace(tzinfo=connection.timezone)
        out.append(value.isoformat())
    return out


def _text(value: Any) -> Any:
    """A stored JSON column's text (NULL stays None)."""
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode()
    return str(value)


def _splice(rows: list[tuple[Any, ...]], connection: Any) -> str:
    quoted: dict[str, str] = {}  # labels and ops repeat: quote each once

    def q(text: str) -> str:
        found = quoted.get(text)
        if found is None:
            found = quoted[text] = json.dumps(text)
        return found

    stamps = _timestamps([row[1] for row in rows], connection)
    if connection.vendor not in ("sqlite", "postgresql"):  # those two hand back str (or None)
        rows = [(*row[:4], *(_text(v) for v in row[4:])) for row in rows]
    # A JSON column holding SQL NULL and one holding JSON null both read as null.
    parts = [
        f'{{"seq":{seq},"ts":"{ts}","model":{q(model)},"op":{q(op)},'
        f'"key":{"null" if key is None else key},"old_key":{"null" if old_key is None else old_key},'
        f'"data":{"null" if data is None else data},'
        f'"changed":{"null" if changed is None else changed}}}'
        for (seq, _, model, op, key, old_key, data, changed), ts in zip(rows, stamps, strict=True)
    ]
    return "[" + ",".join(parts) + "]"
