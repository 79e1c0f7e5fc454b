"""Incoming events, parsed and checked against this site's registration.

A feed page, a pushed batch and a full pull's snapshot rows all arrive as wire
dicts; apply and the pull work on ``IncomingChange`` records, checked once here
so that an event this site cannot take is refused with its model, key, field
and position before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import registry
from ..exceptions import ApplyError
from ..models import Event
from ..registry import Key, ModelOptions
from ..serialization import normalize_key


@dataclass(slots=True)
class IncomingChange:
    """One event as this site will apply it: its model's options, its natural key
    (and the key it had before, for a rename), its data as received, and the wire
    dict it came from (a relay passes that on unchanged)."""

    seq: int
    options: ModelOptions
    op: str
    key: Key
    old_key: Key | None
    data: dict[str, Any]
    raw: dict[str, Any]


def parse_common(raw: dict[str, Any], labels: dict[Any, ModelOptions | None]) -> IncomingChange:
    """``parse`` for the event nearly every page is made of: an upsert of a known
    model with exactly its fields and no rename. Anything else, and every
    error, goes through ``parse``."""
    try:
        options = labels[raw["model"]]
        data = raw["data"]
        if (
            options is not None
            and raw["op"] == "upsert"
            and raw["old_key"] is None
            and type(data) is dict
            and data.keys() == options.field_names
        ):
            return IncomingChange(
                int(raw["seq"]), options, "upsert", normalize_key(options, raw["key"]), None,
                data, raw,
            )  # fmt: skip
    except Exception:  # noqa: S110 - the full parse below names what is wrong
        pass
    return parse(raw, labels)


def parse(
    raw: dict[str, Any], labels: dict[Any, ModelOptions | None] | None = None
) -> IncomingChange:
    """One wire event -> a checked change. ``labels`` caches label -> options for a page."""
    if labels is None:
        labels = {}
    seq = raw.get("seq")
    label = raw.get("model")
    try:
        options = labels[label]
    except KeyError:
        options = labels[label] = registry.options_for_label(str(label))
    except TypeError:  # not hashable: not a label
        options = None
    if options is None:
        raise ApplyError(
            "model is not registered with changefeed_sync on this site",
            model=str(label),
            key=raw.get("key"),
            seq=seq,
        )
    op = raw.get("op")
    try:
        key = normalize_key(options, raw.get("key") or [])
        old_key = normalize_key(options, raw["old_key"]) if raw.get("old_key") else None
    except (ValueError, TypeError, Exception) as exc:
        raise ApplyError(
            f"bad natural key ({exc})", model=options.label, key=raw.get("key"), seq=seq
        ) from exc
    if op == Event.DELETE:
        return IncomingChange(int(seq or 0), options, Event.DELETE, key, None, {}, raw)
    if op != Event.UPSERT:
        raise ApplyError(f"unknown operation {op!r}", model=options.label, key=key, seq=seq)
    data = raw.get("data")
    if not isinstance(data, dict):
        raise ApplyError("upsert carries no data", model=options.label, key=key, seq=seq)
    if data.keys() != options.field_names:  # the common case is one comparison
        _check_fields(options, key, data, seq)
    return IncomingChange(int(seq or 0), options, Event.UPSERT, key, old_key, data, raw)


def _check_fields(options: ModelOptions, key: Key, data: dict[str, Any], seq: Any) -> None:
    """Refuse an upsert whose fields are not exactly the ones this site syncs."""
    unknown = set(data) - options.field_names
    if unknown:
        raise ApplyError(
            "event has a field this site's model does not sync",
            model=options.label,
            key=key,
            field=sorted(unknown)[0],
            seq=seq,
        )
    missing = options.field_names - set(data)
    if missing:
        raise ApplyError(
            "event lacks a field this site's model syncs",
            model=options.label,
            key=key,
            field=sorted(missing)[0],
            seq=seq,
        )
