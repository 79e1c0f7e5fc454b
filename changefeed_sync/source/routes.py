"""Routes: what each event of a filtered model is to each filtered Target (issue 14).

A Target with row filters must see a row arrive when it starts matching its filter
and go when it stops, and never learn of rows outside it. Capture decides this as
it writes, because only then are both states of the row known: the database says
which Targets the row belongs to before the write and after it (``membership``),
under the row's lock, and the event carries one entry per Target whose filter
reads the model, in ``Event.routes``::

    ,<route id>:<op>,<route id>:<op>,

    u  upsert: in the filter before and after     j  joined: in after only (upsert)
    l  left: in before only (a delete)            d  deleted while in the filter
    -  nothing for this Target: outside before and after

The route id names a Target *and* the filters it had when the event was routed
(``route_id``): an event without an entry for a Target's current route id was
routed before its filters were set or changed, or by a writer that did not know
them yet, and the feed asks that Target for a Data Pull instead of guessing.
Models no Target filters carry no routes (NULL): nothing is evaluated for them,
and a site without filtered Targets pays one cached read of its Targets per second.

The feed, long-polls, streams and pushes read them (feed.Routed); a parent's change
that moves other models' rows writes their route-only events (cascades.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..exceptions import RowFiltersInvalid
from ..filters import is_filtered
from ..models import Target
from ..registry import ModelOptions
from ..selection import Selection
from . import membership, sequencer
from .feed import Routed
from .membership import Dependent, Reader

UPSERT, JOINED, LEFT, DELETED, NOTHING = "u", "j", "l", "d", "-"


def route_id(target: Target) -> str:
    """A Target's id together with what it reads: changes when its filters change."""
    what = json.dumps(
        [target.pk, target.row_filters, target.allowed_models()], sort_keys=True, default=str
    )
    return hashlib.sha256(what.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Routing:
    """The filtered Targets of one database, as capture routes for them."""

    readers: tuple[Reader, ...]
    ids: dict[int, str]  # target id -> route id
    paths: tuple[Dependent, ...] = ()  # what the filters read across foreign keys

    def moved_by(self, label: str, changed: Iterable[str] | None) -> list[Dependent]:
        """The paths by which a write to model ``label`` changing the fields ``changed``
        (None: a new or deleted row) can move rows of other models."""
        names = None if changed is None else set(changed)
        return [d for d in self.paths if d.parent == label and (names is None or d.field in names)]

    def fields_read(self, label: str) -> set[str]:
        """The fields of model ``label`` its filters read (a foreign key for a path
        through it): a write changing none of them moves no row of it in or out."""
        found: set[str] = set()
        for reader in self.concerned(label):
            q = reader.selection.rows_filter(label) if reader.selection else None
            if q is None:
                return {"*"}  # invalid filters: treat every field as read
            found.update(lookup.split("__")[0] for lookup in membership.lookups(q))
        return found

    def read_through(self, label: str) -> list[Dependent]:
        """The paths from model ``label`` to the parents its filters read."""
        return [d for d in self.paths if d.child == label]

    def concerned(self, label: str) -> list[Reader]:
        """The Targets whose filters read model ``label`` (an entry in each event of it);
        a Target with invalid filters is concerned with every model (member of none)."""
        return [
            r
            for r in self.readers
            if r.selection is None
            or (r.selection.offers(label) and r.selection.rows_filter(label) is not None)
        ]


def _load(using: str) -> Routing | None:
    found = membership.readers(using)
    if not found:
        return None
    targets = Target.objects.using(using).in_bulk([r.target_id for r in found])
    ids = {pk: route_id(t) for pk, t in targets.items()}
    return Routing(tuple(found), ids, tuple(membership.filter_paths(found)))


# A second, as push's list of Targets: a busy source does not read them at every write.
# Asked at every save of every registered model, so read without a lock (a dict's get
# is atomic): two threads that find it stale at once both load it, the last one stays.
ROUTING_SECONDS = 1.0
_routing: dict[str, tuple[float, Routing | None]] = {}


def routing(using: str) -> Routing | None:
    """The filtered Targets of ``using`` (read at most a second ago); None: there are none."""
    now = time.monotonic()
    hit = _routing.get(using)
    if hit is not None and now - hit[0] < ROUTING_SECONDS:
        return hit[1]
    found = _load(using)
    _routing[using] = (now, found)
    return found


def forget(*args: object) -> None:
    """Read the Targets again at the next write (one was saved or deleted here, or a
    model registered or unregistered)."""
    _routing.clear()
    _readings.clear()


def concerned(options: ModelOptions, using: str) -> tuple[Routing, list[Reader]] | None:
    """The routing and the Targets concerned with writes of this model, or None."""
    found = routing(using)
    if found is None:
        return None
    readers = found.concerned(options.label)
    return (found, readers) if readers else None


def upsert_routes(
    found: Routing,
    readers: Iterable[Reader],
    before: frozenset[int] | None,
    after: frozenset[int],
) -> str:
    """The routes of an upsert event: ``before`` None when the row is new."""
    entries = []
    for reader in readers:
        was = before is not None and reader.target_id in before
        now = reader.target_id in after
        op = (UPSERT if was else JOINED) if now else (LEFT if was else NOTHING)
        entries.append(f"{found.ids[reader.target_id]}:{op}")
    return "," + ",".join(entries) + ","


def delete_routes(found: Routing, readers: Iterable[Reader], before: frozenset[int]) -> str:
    """The routes of a delete event: a delete only for the Targets that had the row."""
    entries = [
        f"{found.ids[r.target_id]}:{DELETED if r.target_id in before else NOTHING}" for r in readers
    ]
    return "," + ",".join(entries) + ","


def parse(routes: str) -> dict[str, str]:
    """``Event.routes`` -> route id -> op."""
    found = {}
    for entry in routes.lstrip("*").strip(",").split(","):
        if entry:
            rid, _, op = entry.partition(":")
            found[rid] = op
    return found


def filters_in_effect(target: Target) -> str:
    """What ``Target.filters_route`` must hold: the route id of a filtered Target, ""
    for one without row filters (changing only its models asks for no Data Pull)."""
    return route_id(target) if is_filtered(target.row_filters) else ""


def stamp(target: Target, using: str) -> None:
    """Record, the first time it is seen, the position at which a Target's current row
    filters took effect (``filters_position``): its rows before that position were
    chosen by other filters, or by none, so only a Data Pull started after it tells what
    it should hold. Seen by the feed and the snapshot, whatever changed the filters
    (the admin, ``save()``, ``QuerySet.update``). A Target that never had filters is
    stamped at 0 (nothing to redo)."""
    now = filters_in_effect(target)
    if now == target.filters_route:
        return
    position = 0 if not now and not target.filters_route else sequencer.head(using)
    changed = (
        Target.objects.using(using)
        .filter(pk=target.pk, filters_route=target.filters_route)
        .update(filters_route=now, filters_position=position)
    )
    if changed:
        target.filters_route, target.filters_position = now, position
    else:  # another request stamped it first: take its record
        target.refresh_from_db(using=using, fields=["filters_route", "filters_position"])


def reading(target: Target) -> Routed | str | None:
    """How ``target`` reads the feed: None unfiltered, a ``Routed`` when filtered, or
    why it cannot (as a sentence): its saved filters are invalid. Kept per Target and
    filters: push plans ask after every commit, and checking filters compiles queries."""
    if not is_filtered(target.row_filters):
        return None
    key = (target.name, route_id(target))
    if key in _readings:
        return _readings[key]
    try:
        found: Routed | str = Routed(key[1], frozenset(Selection.of(target).row_filters))
    except RowFiltersInvalid as exc:
        found = str(exc)
    if len(_readings) >= 1000:
        _readings.clear()
    _readings[key] = found
    return found


_readings: dict[tuple[str, str], Routed | str] = {}
