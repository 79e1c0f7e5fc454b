"""An incoming change's column values as this site stores them.

Values come decoded from their wire form, and foreign keys, which travel as the
related row's natural key, become the value the column holds here (the related
row's primary key, or the field a foreign key points at). Every value a change
cannot have is refused naming its model, key, field and position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import registry
from ..exceptions import ApplyError
from ..keys import resolve_keys
from ..registry import Key
from ..serialization import decode_value, normalize_key
from .changes import IncomingChange


class Pending(Exception):
    """A row points at a row written later in the same run."""


def build_values(
    change: IncomingChange,
    using: str,
    maps: dict[str, dict[Key, Any]],
    pending: set[tuple[str, Key]],
) -> dict[str, Any]:
    """Every synced column of ``change`` by attname. Raises ``Pending`` when a foreign
    key points at a row of ``pending`` (written later in the same run)."""
    options = change.options
    data = change.data
    values: dict[str, Any] = {}
    for f, needs_decoding in options.plain_decoding:
        raw = data[f.name]
        # Text as received is what the column takes: no call for most values of a page.
        if not needs_decoding and type(raw) is str:
            values[f.attname] = raw
        else:
            values[f.attname] = _decoded(change, f, raw)
    for fk in options.fk_fields:
        raw = data[fk.name]
        values[fk.attname] = (
            None if raw is None else _related(change, fk, raw, maps, using, pending)
        )
    return values


def key_values(
    change: IncomingChange, using: str, maps: dict[str, dict[Key, Any]]
) -> dict[str, Any]:
    """The columns a row's natural key starts from, by attname: what a rename writes
    first when the rest of the row needs the new key to be there."""
    options = change.options
    values: dict[str, Any] = {}
    for head in options.key_heads:
        f: Any = options.model._meta.get_field(head)
        raw = change.data[head]
        if not f.is_relation:
            values[f.attname] = _decoded(change, f, raw)
        else:
            values[f.attname] = (
                None if raw is None else _related(change, f, raw, maps, using, set())
            )
    return values


def _decoded(change: IncomingChange, f: Any, raw: Any) -> Any:
    try:
        return decode_value(f, raw)
    except Exception as exc:
        raise ApplyError(
            f"bad value {raw!r} ({exc})",
            model=change.options.label,
            key=change.key,
            field=f.name,
            seq=change.seq,
        ) from exc


def _related(
    change: IncomingChange,
    fk: Any,
    raw: Any,
    maps: dict[str, dict[Key, Any]],
    using: str,
    pending: set[tuple[str, Key]],
) -> Any:
    """The value foreign key ``fk`` holds here for the natural key ``raw`` (not None)."""
    options = change.options
    mapping = maps.get(fk.name)
    if mapping is None:  # the related model is not registered
        try:
            related = fk.related_model._default_manager.db_manager(using).get_by_natural_key(*raw)
        except Exception as exc:
            raise ApplyError(
                "foreign natural key resolves to nothing",
                model=options.label,
                key=change.key,
                field=fk.name,
                seq=change.seq,
            ) from exc
        return getattr(related, fk.target_field.attname)
    value = mapping.get(tuple(raw))
    if value is not None:
        return value
    rel_options = registry.get_options(fk.related_model)
    assert rel_options is not None
    rel_key = normalize_key(rel_options, raw)
    if (rel_options.label, rel_key) in pending:
        raise Pending
    raise ApplyError(
        f"foreign natural key {list(rel_key)!r} of {rel_options.label} resolves to nothing",
        model=options.label,
        key=change.key,
        field=fk.name,
        seq=change.seq,
    )


def fk_maps(changes: Sequence[IncomingChange], using: str) -> dict[str, dict[Key, Any]]:
    """Per foreign key: the natural key as it came on the wire (a tuple) -> the
    value to store, for the related rows that exist on ``using``. Each distinct
    key is normalized and looked up once, however many rows point at it."""
    options = changes[0].options
    maps: dict[str, dict[Key, Any]] = {}
    for fk in options.fk_fields:
        rel_options = registry.get_options(fk.related_model)
        if rel_options is None:
            continue
        normalized: dict[Key, Key] = {}
        for change in changes:
            raw = change.data[fk.name]
            if raw is None:
                continue
            try:
                wire = tuple(raw)
                if wire not in normalized:
                    normalized[wire] = normalize_key(rel_options, wire)
            except Exception as exc:
                raise ApplyError(
                    f"bad foreign natural key {raw!r} ({exc})",
                    model=options.label,
                    key=change.key,
                    field=fk.name,
                    seq=change.seq,
                ) from exc
        # Targets of a foreign key need not be the related model's primary key.
        mapped = resolve_keys(rel_options, normalized.values(), using)
        if fk.target_field.attname != rel_options.model._meta.pk.attname:
            to_attr = dict(
                rel_options.model._base_manager.using(using)
                .filter(pk__in=list(mapped.values()))
                .values_list("pk", fk.target_field.attname)
            )
            mapped = {k: to_attr[pk] for k, pk in mapped.items()}
        maps[fk.name] = {wire: mapped[key] for wire, key in normalized.items() if key in mapped}
    return maps
