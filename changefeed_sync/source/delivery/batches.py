"""What a push delivery sends: a target's undelivered events as bodies under the size limit.

The events after the target's ``delivered_seq`` (only the models it receives, and
of those its row filters read, the events routed to it: feed.read),
split so that no body exceeds ``CHANGEFEED_SYNC_DELIVERY_MAX_BYTES``. Many
targets usually wait at the same position: ``plan`` reads the feed once for all
of them (per position and model selection) and encodes the events once; each
target's body only adds its own small header (its batch id), and push.py signs
it with the target's own secret.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ... import conf
from ...exceptions import FilterChanged
from ...models import Target
from ...serialization import PROTOCOL_VERSION
from .. import feed, routes, sequencer
from ..feed import Routed

logger = logging.getLogger("changefeed_sync.push")


@dataclass(frozen=True)
class Chunk:
    """Consecutive events of one feed read, encoded once, under the size limit.

    ``events_json`` is the JSON array as it goes into every body that carries
    it: targets waiting at the same position share it.
    """

    since: int
    last_seq: int
    events_json: str


class Batch:
    """One webhook body for one target: the events after ``since`` up to ``last_seq``.

    Planned batches carry the shared events JSON and build their body when sent, not
    when planned: 100 targets need not hold 100 bodies at once.
    """

    def __init__(
        self,
        target: Target,
        since: int,
        last_seq: int,
        body: bytes | None = None,
        *,
        events_json: str | None = None,
        source_id: str | None = None,
    ) -> None:
        if body is None and events_json is None:
            raise TypeError("a Batch needs its body or its events' JSON")
        self.target = target
        self.since = since
        self.last_seq = last_seq
        self.source_id = source_id
        self._body = body
        self._events_json = events_json

    def __repr__(self) -> str:
        return f"<Batch {self.id}>"

    @property
    def id(self) -> str:
        return f"{self.target.name}-{self.since}-{self.last_seq}"

    @property
    def body(self) -> bytes:
        if self._body is None:
            assert self._events_json is not None
            head = _header(self.target.name, self.since, self.last_seq, self.source_id)
            self._body = (head + self._events_json + "}").encode()
        return self._body


#: Events read from the feed per planning round (the feed's default page size).
PAGE_EVENTS = 1000


@dataclass
class Plan:
    """What one round delivers to one target: batches in order, and whether the feed
    has more after them (another round then follows)."""

    target: Target
    batches: list[Batch]
    more: bool


def plan(
    targets: Iterable[Target], using: str, *, max_events: int = PAGE_EVENTS
) -> dict[int, Plan]:
    """The next page of undelivered events of each target, as batches under the size limit.

    The feed is read once per position and model selection, and the events are
    encoded once per read, whatever the number of targets at that position.
    Targets with nothing to deliver get no plan.
    """
    groups: dict[tuple[int, tuple[str, ...] | None, Routed | None], list[Target]] = {}
    newest: int | None = None
    for target in targets:
        routed = routes.reading(target)
        if isinstance(routed, str):
            continue  # not served to it (takes_deliveries says so too)
        # A target that already read the feed further needs nothing before that.
        since = max(target.delivered_seq, target.last_seen_seq or 0)
        routes.stamp(target, using)
        if since < target.filters_position:
            # Its filters changed after what it holds: a Data Pull, not a push, repairs it.
            logger.warning(
                "no delivery to %s: its row filters changed at position %s, after its "
                "checkpoint %s: run a full Data Pull", target.name,
                target.filters_position, since,
            )  # fmt: skip
            continue
        if since > target.delivered_seq:
            if newest is None:
                newest = feed.head(using)
            if since > newest:
                # Beyond every position given out (recorded before the feed refused such
                # cursors, or the outbox was recreated under it): not a position it has.
                since = target.delivered_seq
        labels = target.allowed_models()
        key = (since, None if labels is None else tuple(labels), routed)
        groups.setdefault(key, []).append(target)
    if not groups:
        return {}
    source_id = sequencer.state(using).source_id
    plans: dict[int, Plan] = {}
    for (since, selection, routed), members in groups.items():
        chunks, more = _read(since, selection, members, source_id, using, max_events, routed)
        for target in members:
            if chunks:
                plans[target.pk] = Plan(target, _batches(target, chunks, source_id), more)
    return plans


def _read(
    since: int,
    models: tuple[str, ...] | None,
    members: list[Target],
    source_id: str | None,
    using: str,
    max_events: int,
    routed: Routed | None = None,
) -> tuple[list[Chunk], bool]:
    """One page of the feed after ``since`` in chunks that fit every member's body."""
    try:
        page = feed.read(
            since, max_events, using=using, models=None if models is None else list(models),
            routed=routed,
        )  # fmt: skip
    except FilterChanged as exc:
        logger.warning("no delivery to %s: %s", ", ".join(t.name for t in members), exc)
        return [], False
    if not page.events:
        return [], False
    # Room for the longest header among them (and the closing brace).
    longest = max(members, key=lambda t: len(t.name)).name
    room = len(_header(longest, page.last_seq, page.last_seq, source_id)) + 1
    return _chunks(since, page.events, conf.delivery_max_bytes() - room), page.more


def batches(target: Target, using: str, *, max_events: int = PAGE_EVENTS) -> Iterator[Batch]:
    """Undelivered events of ``target`` as signed-ready bodies under the size limit."""
    planned = plan([target], using, max_events=max_events).get(target.pk)
    if planned is None:
        return
    yield from planned.batches
    more = planned.more
    source_id = planned.batches[0].source_id
    models = target.allowed_models()
    key = None if models is None else tuple(models)
    routed = routes.reading(target)
    while more and not isinstance(routed, str):
        since = planned.batches[-1].last_seq
        chunks, more = _read(since, key, [target], source_id, using, max_events, routed)
        if not chunks:
            return
        planned = Plan(target, _batches(target, chunks, source_id), more)
        yield from planned.batches


def _batches(target: Target, chunks: list[Chunk], source_id: str | None) -> list[Batch]:
    return [
        Batch(target, c.since, c.last_seq, events_json=c.events_json, source_id=source_id)
        for c in chunks
    ]


def _chunks(since: int, events: list[dict[str, Any]], limit_bytes: int) -> list[Chunk]:
    """Consecutive runs of ``events`` whose JSON array stays under ``limit_bytes``; an
    event that alone is bigger still goes, alone."""
    chunks: list[Chunk] = []
    parts: list[str] = []
    size = 1  # "[" and "]", less the comma the first event does not need
    for index, event in enumerate(events):
        text = json.dumps(event, separators=(",", ":"))
        if parts and size + len(text) + 1 > limit_bytes:
            last = events[index - 1]["seq"]
            chunks.append(Chunk(since, last, "[" + ",".join(parts) + "]"))
            since, parts, size = last, [], 1
        parts.append(text)
        size += len(text) + 1
    if parts:
        chunks.append(Chunk(since, events[-1]["seq"], "[" + ",".join(parts) + "]"))
    return chunks


def _body(
    target: Target, since: int, events: list[dict[str, Any]], source_id: str | None = None
) -> bytes:
    """The body of one batch of ``events`` (as the planned batches build theirs)."""
    text = "[" + ",".join(json.dumps(e, separators=(",", ":")) for e in events) + "]"
    return (_header(target.name, since, events[-1]["seq"], source_id) + text + "}").encode()


def _header(name: str, since: int, last: int, source_id: str | None) -> str:
    """A body up to its events: ``{"protocol":..,"id":..,...,"events":``."""
    payload: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "id": f"{name}-{since}-{last}",
        **({"source_id": source_id} if source_id is not None else {}),
        "since": since,
        "last_seq": last,
    }
    return json.dumps(payload, separators=(",", ":"))[:-1] + ',"events":'
