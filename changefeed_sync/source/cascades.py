"""A parent's write that moves other models' rows into or out of row filters (issue 14).

A filter through a foreign key (copies whose language's country is "fr") reads a
parent's column: a write changing it (the country's code, a language's country)
moves the parent's children in or out of the filter without touching them. For the
filtered Targets, capture then writes "route-only" events of those children (their
routes start with ``*``, and reach no other reader): deletes of the rows that left,
by the keys the Targets hold, before the parent's own event and children first; then
upserts of the rows that came in, as stored now, parents first.

Locks keep this true under concurrent writers: the parent and its children are
locked for update before their membership is read, and a writer of a child locks the
parents its filters read for share (``lock_parents``) before it reads its own, so the
two never decide on each other's half-done state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import registry
from ..models import Event
from ..outbox import NewEvent
from ..registry import ModelOptions
from ..serialization import key_of_row, payloads_from_db
from . import membership, routes
from .membership import Dependent, Reader
from .read_locks import lock_rows

ROUTE_ONLY = "*"


@dataclass
class _Group:
    """The rows of one child model one path from the written parents reaches."""

    path: Dependent
    options: ModelOptions
    readers: list[Reader]
    pks: list[Any]
    before: dict[Any, frozenset[int]]
    keys: dict[Any, list[Any]]

    @property
    def depth(self) -> int:
        return self.path.via.count("__") + 1


@dataclass
class Cascade:
    routing: routes.Routing
    groups: list[_Group]


def before_write(
    options: ModelOptions, pks: list[Any], changed: Iterable[str] | None, using: str
) -> Cascade | None:
    """Before a write of ``options``' rows ``pks`` changing the fields ``changed``: the
    children it may move, locked, with the filtered Targets that have each and its key."""
    found = routes.routing(using)
    if found is None or not pks:
        return None
    paths = found.moved_by(options.label, changed)
    if not paths:
        return None
    lock_rows(options.model, pks, using, share=False)
    groups = []
    for path in paths:
        child = registry.options_for_label(path.child)
        readers = found.concerned(path.child)
        if child is None or not readers:
            continue
        child_pks = membership.dependent_pks(path, pks, using)
        if not child_pks:
            continue
        lock_rows(child.model, child_pks, using, share=False)
        before = membership.members(child, child_pks, using, readers)
        groups.append(
            _Group(path, child, readers, child_pks, before, _keys(child, child_pks, using))
        )
    return Cascade(found, groups) if groups else None


def events(cascade: Cascade, using: str) -> tuple[list[NewEvent], list[NewEvent]]:
    """After the write: (deletes of the children that left, children first; upserts of
    those that came in, parents first), each routed only to the Targets concerned."""
    leavers: list[NewEvent] = []
    joiners: list[NewEvent] = []
    ids = cascade.routing.ids
    for group in sorted(cascade.groups, key=lambda g: -g.depth):
        after = membership.members(group.options, group.pks, using, group.readers)
        for pk in group.pks:
            had, has = group.before.get(pk, frozenset()), after.get(pk, frozenset())
            if had - has:
                entries = [f"{ids[r.target_id]}:{'l' if r.target_id in had - has else '-'}"
                           for r in group.readers]  # fmt: skip
                leavers.append(
                    NewEvent(group.options.label, Event.DELETE, group.keys[pk],
                             routes=_route_only(entries))
                )  # fmt: skip
    for group in sorted(cascade.groups, key=lambda g: g.depth):
        after = membership.members(group.options, group.pks, using, group.readers)
        came = {pk: after.get(pk, frozenset()) - group.before.get(pk, frozenset())
                for pk in group.pks}  # fmt: skip
        payloads = payloads_from_db(group.options, [pk for pk, c in came.items() if c], using)
        for pk, payload in payloads.items():
            entries = [f"{ids[r.target_id]}:{'j' if r.target_id in came[pk] else '-'}"
                       for r in group.readers]  # fmt: skip
            joiners.append(
                NewEvent(group.options.label, Event.UPSERT, payload["key"], None,
                         payload["data"], None, _route_only(entries))
            )  # fmt: skip
    return leavers, joiners


def lock_parents(found: routes.Routing, options: ModelOptions, pks: list[Any], using: str) -> None:
    """Lock for share the parent rows the filters of ``options``' model read from its
    rows ``pks``: a parent's writer, which locks them for update, waits for this
    transaction, or this one for it, before either reads who belongs where."""
    if not pks:
        return
    manager = options.model._base_manager.using(using)
    for path in found.read_through(options.label):
        parent = registry.options_for_label(path.parent)
        if parent is None:
            continue
        parents = manager.filter(pk__in=pks).values_list(f"{path.via}__pk", flat=True)
        lock_rows(parent.model, [p for p in parents if p is not None], using, share=True)


def _keys(options: ModelOptions, pks: list[Any], using: str) -> dict[Any, list[Any]]:
    rows = options.model._base_manager.using(using).filter(pk__in=pks)
    return {
        r[0]: list(key_of_row(options, r[1:])) for r in rows.values_list("pk", *options.lookups)
    }


def _route_only(entries: list[str]) -> str:
    return ROUTE_ONLY + "," + ",".join(entries) + ","
