"""The framing of a page of events, checked before anything of it is applied.

Feed pages (follow.py) and pushed batches (webhook.py) alike say which span of
positions they cover (``since``, ``last_seq``) and carry events. Nothing of a
page is applied, and no checkpoint moves, unless:

1. every event's ``seq`` is an integer, and they strictly increase;
2. every ``seq`` lies inside ``(since, last_seq]``;
3. the page ends at its last event: ``last_seq`` is the last event's ``seq``,
   or ``since`` when there are none. The source never moves a reader past a
   position it did not send (feed.read ends a page at its last row; push ends a
   batch at its last event), so a page claiming positions after its last event
   would make the target skip events it never saw;
4. every upsert's ``key`` is the natural key its ``data`` gives (a key part
   through a foreign key, ``language.country.code``, is read from that foreign
   key's natural key in ``data``), so no event writes a row other than the one
   it names.

Positions are **not** consecutive, so a page with holes between its events is
not refused: ids are taken by transactions that roll back later (PostgreSQL
sequences and InnoDB auto-increments are not transactional), and a Target
limited to some models does not see the others' events. What the protocol
does promise, that no event is skipped, rests on the source's commit order
(README, "How positions stay gap-free") and on rule 3, which leaves no span
after a page's last event unaccounted for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import registry
from ..exceptions import FramingError, ProtocolError
from ..registry import ModelOptions
from ..serialization import decode_value, encode_value

#: Largest position: positions are 64-bit signed ids.
MAX_POSITION = 2**63 - 1


def check_page(events: Sequence[Any], *, since: int, last_seq: int) -> None:
    """Raise FramingError unless ``events`` are framed soundly in ``(since, last_seq]``
    and every upsert's key matches its data (rules 1-4 above); ProtocolError for an
    event that is not in the wire form at all."""
    if not 0 <= since <= MAX_POSITION or not 0 <= last_seq <= MAX_POSITION:
        raise FramingError(f"positions must be between 0 and {MAX_POSITION}")
    if last_seq < since:
        raise FramingError(f"last_seq {last_seq} is before since {since}")
    previous = since
    for index, event in enumerate(events):
        _check_shape(index, event)
        seq = event.get("seq")
        if type(seq) is not int:
            raise FramingError(f"event #{index} has no integer seq (got {seq!r:.40})")
        if seq <= previous:
            raise FramingError(
                f"event seq {seq} does not follow {previous} (positions must increase"
                + (f" after since {since})" if index == 0 else ")")
            )
        if seq > last_seq:
            raise FramingError(f"event seq {seq} is after last_seq {last_seq}")
        previous = seq
    if previous != last_seq:
        raise FramingError(
            f"last_seq {last_seq} is not the page's last position ({previous}): "
            "a page ends at its last event"
        )
    _check_keys(events)


def _check_shape(index: int, event: Any) -> None:
    """ProtocolError (a malformed page, not a badly framed one) unless ``event`` has
    the wire form: model and op as text, key a list, old_key null or a list, data
    null or an object."""
    if not isinstance(event, dict):
        raise ProtocolError(f"event #{index} is not an object")
    problem = (
        "model" if not isinstance(event.get("model"), str)
        else "op" if not isinstance(event.get("op"), str)
        else "key" if not isinstance(event.get("key"), list)
        else "old_key" if not isinstance(event.get("old_key"), list | None)
        else "data" if not isinstance(event.get("data"), dict | None)
        else None
    )  # fmt: skip
    if problem is not None:
        raise ProtocolError(
            f"event #{index}: {problem} is not as the protocol says "
            "(model and op text, key a list, old_key null or a list, data null or an object)"
        )


# ------------------------------------------------------------ keys against data

#: Per key part: (field name in data, index in that foreign key's natural key, or
#: None for a local field); None for a part that data cannot give.
_Part = tuple[str, int | None] | None
_parts_cache: dict[ModelOptions, tuple[_Part, ...]] = {}


def _key_parts(options: ModelOptions) -> tuple[_Part, ...]:
    cached = _parts_cache.get(options)
    if cached is not None:
        return cached
    parts: list[_Part] = []
    for path in options.natural_key:
        head, _, rest = path.partition(".")
        if not rest:
            parts.append((head, None))
            continue
        field = options.model._meta.get_field(head)
        related = registry.get_options(field.related_model)  # type: ignore[arg-type]
        if related is not None and rest in related.natural_key:
            parts.append((head, related.natural_key.index(rest)))
        else:
            parts.append(None)  # e.g. a Django natural_key(): not derivable here
    result = tuple(parts)
    _parts_cache[options] = result
    return result


def key_from_data(options: ModelOptions, data: dict[str, Any]) -> list[Any]:
    """The natural key ``data`` gives, in wire form; ``...`` (Ellipsis) for a
    part it cannot give. Raises LookupError/TypeError for data of the wrong shape."""
    out: list[Any] = []
    for part in _key_parts(options):
        if part is None:
            out.append(...)
            continue
        name, index = part
        value = data[name]
        if index is not None and value is not None:
            if not isinstance(value, list):
                raise TypeError(f"{name} is not a natural key")
            value = value[index]
        out.append(value)
    return out


def _same(options: ModelOptions, key: list[Any], derived: list[Any]) -> bool:
    if key == derived:
        return True
    if len(key) != len(derived):
        return False
    for field, a, b in zip(options.key_fields, key, derived, strict=True):
        if b is ... or a == b:
            continue
        try:  # the same value in another wire form ("5" and 5, "1.50" and "1.5")
            if encode_value(field, decode_value(field, a)) != encode_value(
                field, decode_value(field, b)
            ):
                return False
        except Exception:  # noqa: BLE001 - a value apply will refuse itself, naming it
            return False
    return True


def _check_keys(events: Sequence[dict[str, Any]]) -> None:
    labels: dict[Any, ModelOptions | None] = {}
    for event in events:
        if event.get("op") != "upsert":
            continue
        label = event.get("model")
        try:
            options = labels[label]
        except KeyError:
            options = labels[label] = registry.options_for_label(str(label))
        except TypeError:
            continue  # not a label: apply names the problem
        data, key = event.get("data"), event.get("key")
        if options is None or not isinstance(data, dict) or not isinstance(key, list):
            continue  # apply refuses these, naming model, key and position
        try:
            derived = key_from_data(options, data)
        except (LookupError, TypeError):
            continue  # a missing field or a malformed foreign key: apply names it
        if not _same(options, key, derived):
            shown = [None if v is ... else v for v in derived]
            raise FramingError(
                f"event seq {event.get('seq')} of {options.label}: its key {key!r:.200} "
                f"is not the natural key of its data {shown!r:.200}",
                code="key_mismatch",
            )
