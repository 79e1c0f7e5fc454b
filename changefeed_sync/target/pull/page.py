"""One snapshot page of one model: compared with the rows here, the new or changed
ones written, the rows found recorded as seen.

Unique values that are not the natural key: the target may hold, under another
natural key, a value an incoming row is to have. Upserts match on the natural key
only, so such a row is a clash, not a match. A page's write runs in a savepoint;
when it fails on an IntegrityError, the rows in the way are moved aside
(moves.py) and the page is compared and written again. Only pages that clash pay
for any of this: a savepoint per page written is all the others cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction

from ... import outbox
from ...exceptions import ApplyError
from ...keys import resolve_keys
from ...models import Event
from ...registry import Key
from ..changes import IncomingChange, parse
from ..file_transfer import Stage
from .writer import ModelWriter


class _Lost(Exception):
    """A row written by the general path is not there after its write."""

    def __init__(self, key: Key) -> None:
        super().__init__(key)
        self.key = key


# Tries of one page's write, each after moving aside the rows in its way.
_WRITE_TRIES = 8


@dataclass
class _Compared:
    """A page against the rows here: what to write, and what is already here."""

    tally: dict[str, int] = field(
        default_factory=lambda: {"created": 0, "updated": 0, "unchanged": 0}
    )
    changes: list[IncomingChange] = field(default_factory=list)
    pks: list[Any] = field(default_factory=list)  # of each change: its row here, or None
    created: list[Key] = field(default_factory=list)
    seen: list[Any] = field(default_factory=list)  # primary keys here of the page's rows


def pull_page(
    model: ModelWriter,
    rows: list[dict[str, Any]],
    counts: dict[str, int],
    stage: Stage | None,
) -> None:
    """Upsert one page of one model; record the target pks of its rows as seen.

    The write runs in a savepoint: when it clashes with rows here on a unique
    constraint that is not the natural key, those rows are moved out of the way
    (``Moves.make_room``) and the page is compared and written again."""
    options = model.options
    keys = _keys(model, rows)
    track = not (model.was_empty or model.relinking)  # the pks of the rows written
    for attempt in range(_WRITE_TRIES):
        # A table empty at the start has none of the keys, unless a try failed.
        fresh = model.was_empty and not model.relinking and not attempt
        page = _compare(model, keys, rows, {} if fresh else model.reader.by_keys(keys))
        if not page.changes:
            break
        try:
            _write(model, page, track)
        except (IntegrityError, _Lost) as exc:
            if attempt + 1 < _WRITE_TRIES and model.moves.make_room(page.changes):
                continue
            if isinstance(exc, _Lost):
                raise ApplyError(
                    "row is not on the target after its write", model=options.label, key=exc.key
                ) from None
            raise
        break
    for name, n in page.tally.items():
        counts[name] += n
    model.moves.written_again(keys)  # or equal to the source's row
    if page.changes and model.relay:
        _relay_upserts(model, page.changes)
    if not model.relinking:
        model.seen.add(page.seen)
    if stage is not None and options.file_fields:
        stage.check(options, rows, counts)


def _keys(model: ModelWriter, rows: list[dict[str, Any]]) -> list[Key]:
    keys = []
    key_from_wire = model.reader.key_from_wire
    for row in rows:
        try:
            keys.append(key_from_wire(row["key"]))
        except Exception as exc:
            raise ApplyError(
                f"bad natural key ({exc})", model=model.options.label, key=row.get("key")
            ) from exc
    return keys


def _compare(
    model: ModelWriter,
    keys: list[Key],
    rows: list[dict[str, Any]],
    current: dict[Key, tuple[Any, Any]],
) -> _Compared:
    """The page's rows that are new or differ from ``current`` (natural key -> the
    row here: its pk and data), as changes to write."""
    options = model.options
    fields = options.field_names
    page = _Compared()
    for key, row in zip(keys, rows, strict=True):
        data = row["data"]
        found = current.get(key)
        if found is not None:
            page.seen.append(found[0])
            if found[1] == data:
                page.tally["unchanged"] += 1
                continue
            page.tally["updated"] += 1
            page.pks.append(found[0])
        else:
            page.tally["created"] += 1
            page.created.append(key)
            page.pks.append(None)
        if not isinstance(data, dict) or data.keys() != fields:
            # Same validation and errors as feed events (unknown or missing fields).
            parse(
                {"seq": 0, "model": options.label, "op": "upsert", "key": list(key), "data": data}
            )
        page.changes.append(IncomingChange(0, options, Event.UPSERT, key, None, data, row))
    return page


def _write(model: ModelWriter, page: _Compared, track: bool) -> None:
    """Write the page's changes in a savepoint; with ``track``, add the primary keys
    of the rows created to those seen."""
    with transaction.atomic(using=model.using):
        written = model.write(page.changes, page.pks, want_pks=track)
        if track and written is not None:
            page.seen.extend(written)
        elif track and page.created:
            there = resolve_keys(model.options, page.created, model.using)
            if len(there) < len(page.created):
                # MySQL's general path: a clash on another unique key updated
                # the other row instead. Undone with the savepoint.
                raise _Lost(next(k for k in page.created if k not in there))
            page.seen.extend(there.values())


def _relay_upserts(model: ModelWriter, changes: list[IncomingChange]) -> None:
    """A relay's events for the rows one write of the pull created or updated, with
    their key and data as received. A foreign key written null for now (its row comes
    later) is null in the event too (a many-to-many link left out is left out), as it
    is in the row: a target of this site then never meets a key to a row it does not
    have yet, even in a cycle; the second pass that sets it writes the row again, and
    its event carries the final data."""
    label = model.options.label
    overrides = model.overrides
    events = []
    for index, change in enumerate(changes):
        data = change.raw["data"]
        if index in overrides:
            data = {**data, **overrides[index]}
        events.append(outbox.make_event(label, Event.UPSERT, change.raw["key"], data=data))
    outbox.write(model.using, events, locked=True)
