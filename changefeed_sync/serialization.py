"""Model rows <-> wire payloads.

A payload is ``{"key": [...], "data": {field: value}}``. Values are JSON:
foreign keys travel as the related row's natural key (a list), many-to-many
fields as a list of natural keys, everything else in the text form that the
field's own ``to_python`` reads back exactly (Decimal and big integers as
strings where JSON would lose them, binary as base64, datetimes in ISO 8601
with their offset).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import uuid
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any

from django.db import models
from django.utils.duration import duration_iso_string

from . import registry
from .registry import TEXT_TYPES, Key, ModelOptions

PROTOCOL_VERSION = 1

# Beyond this, a JSON number may not survive a JavaScript (or float) reader.
_SAFE_INT = 2**53


def encode_value(field: Any, value: Any) -> Any:
    """One Python value of ``field`` -> its JSON form."""
    if value is None:
        return None
    if isinstance(field, models.JSONField):
        return value
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -_SAFE_INT < value < _SAFE_INT else str(value)
    if isinstance(value, float):
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return duration_iso_string(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | memoryview | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "name") and isinstance(field, models.FileField):
        return value.name or ""
    return str(value)


def decode_value(field: Any, value: Any) -> Any:
    """The JSON form of a value of ``field`` -> the Python value to store."""
    if value is None:
        return None
    if type(value) is str and field.get_internal_type() in TEXT_TYPES:
        return value
    if isinstance(field, models.JSONField):
        return value
    if isinstance(field, models.BinaryField) and isinstance(value, str):
        return base64.b64decode(value)
    return field.to_python(value)


def key_of_row(options: ModelOptions, values: Sequence[Any]) -> Key:
    """Encoded natural key from the raw values of ``options.lookups``."""
    return tuple(encode_value(f, v) for f, v in zip(options.key_fields, values, strict=True))


def normalize_key(options: ModelOptions, key: Iterable[Any]) -> Key:
    """A key as received -> the same form ``key_of_row`` produces, so they compare equal."""
    items = tuple(key)
    if len(items) != len(options.key_fields):
        raise ValueError(
            f"natural key of {options.label} has {len(options.key_fields)} parts, got {len(items)}"
        )
    if options.text_key:
        # Nothing to normalize in the common case: called for every key of every event.
        for v in items:
            if type(v) is not str:
                break
        else:
            return items
    return tuple(
        encode_value(f, decode_value(f, v)) for f, v in zip(options.key_fields, items, strict=True)
    )


def key_of_instance(options: ModelOptions, instance: models.Model) -> Key:
    """Natural key from an instance in memory (follows foreign keys, which may query)."""
    values = []
    for path in options.natural_key:
        try:
            values.append(attrgetter(path)(instance))
        except AttributeError:
            values.append(None)  # a nullable foreign key along the path
    return key_of_row(options, values)


def key_from_attvalues(options: ModelOptions, values: dict[str, Any], using: str) -> Key:
    """Natural key from column values (``attname -> value``), e.g. as they were loaded.

    A path through a foreign key costs one query on the related table.
    """
    parts: list[Any] = []
    related: dict[str, dict[str, Any] | None] = {}
    for path, lookup in zip(options.natural_key, options.lookups, strict=True):
        head, _, rest = path.partition(".")
        f = options.model._meta.get_field(head)
        if not rest:
            parts.append(values.get(f.attname))  # type: ignore[union-attr]
            continue
        if head not in related:
            fk_value = values.get(f.attname)  # type: ignore[union-attr]
            rests = [
                lk.partition("__")[2] for lk in options.lookups if lk.partition("__")[0] == head
            ]
            related[head] = (
                None
                if fk_value is None
                else f.related_model._base_manager.using(using)  # type: ignore[union-attr]
                .filter(pk=fk_value)
                .values(*rests)
                .first()
            )
        row = related[head]
        parts.append(None if row is None else row[lookup.partition("__")[2]])
    return key_of_row(options, parts)


# --------------------------------------------------------------------------
# Foreign keys: how a related row is named on the wire.


def related_key_lookups(fk: Any) -> tuple[str, ...] | None:
    """Lookups (relative to the related model) giving its natural key, if registered."""
    options = registry.get_options(fk.related_model)
    return options.lookups if options is not None else None


def encode_django_natural_key(related: models.Model) -> list[Any]:
    """A related row of an unregistered model that follows Django's natural key
    convention (``natural_key()`` / ``get_by_natural_key()``, checked by E008)."""
    return [encode_value(None, v) for v in related.natural_key()]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Payloads.


def payload_from_instance(options: ModelOptions, instance: models.Model) -> dict[str, Any]:
    """Payload of an instance in memory, for models whose options say it can be
    (``payload_in_memory``); anything else is read with ``payloads_from_db``."""
    assert options.payload_in_memory, options.label
    data = {f.name: encode_value(f, f.value_from_object(instance)) for f in options.plain_fields}
    return {"key": list(key_of_instance(options, instance)), "data": data}


def payloads_from_db(
    options: ModelOptions, pks: Sequence[Any], using: str
) -> dict[Any, dict[str, Any]]:
    """Payloads of rows read fresh from the database, one query per chunk (plus M2M)."""
    result: dict[Any, dict[str, Any]] = {}
    if not pks:
        return result
    model = options.model
    plain = [(f, f.attname) for f in options.plain_fields]
    fks: list[tuple[Any, list[str] | None]] = []
    names: list[str] | None
    columns: list[str] = ["pk", *options.lookups, *(name for _, name in plain)]
    for fk in options.fk_fields:
        rel = related_key_lookups(fk)
        if rel is None:
            fks.append((fk, None))
            columns.append(fk.attname)
        else:
            names = [f"{fk.name}__{lookup}" for lookup in rel]
            fks.append((fk, names))
            columns.append(fk.attname)
            columns.extend(names)
    nk = len(options.lookups)
    for chunk in chunked(list(pks), 500):
        for row in model._base_manager.using(using).filter(pk__in=chunk).values(*columns):
            data: dict[str, Any] = {}
            for f, attname in plain:
                data[f.name] = encode_value(f, row[attname])
            for fk, names in fks:
                if row[fk.attname] is None:
                    data[fk.name] = None
                elif names is None:
                    related = fk.related_model._base_manager.using(using).get(pk=row[fk.attname])
                    data[fk.name] = encode_django_natural_key(related)
                else:
                    rel_options = registry.get_options(fk.related_model)
                    assert rel_options is not None
                    data[fk.name] = list(key_of_row(rel_options, [row[n] for n in names]))
            key = key_of_row(options, [row[lookup] for lookup in columns[1 : 1 + nk]])
            result[row["pk"]] = {"key": list(key), "data": data}
    for m2m in options.m2m_fields:
        keys = _m2m_keys(m2m, list(result), using)
        for pk, payload in result.items():
            payload["data"][m2m.name] = keys.get(pk, [])
    return result


def _m2m_keys(m2m: Any, pks: Sequence[Any], using: str) -> dict[Any, list[list[Any]]]:
    """Natural keys of the rows each of ``pks`` points at through ``m2m``, sorted."""
    through = m2m.remote_field.through
    source_col = m2m.m2m_field_name()
    target_col = m2m.m2m_reverse_field_name()
    rel_options = registry.get_options(m2m.related_model)
    out: dict[Any, list[list[Any]]] = {pk: [] for pk in pks}
    for chunk in chunked(list(pks), 500):
        if rel_options is not None:
            names = [f"{target_col}__{lookup}" for lookup in rel_options.lookups]
            rows = through._base_manager.using(using).filter(**{f"{source_col}__in": chunk})
            for row in rows.values_list(f"{source_col}_id", *names):
                out[row[0]].append(list(key_of_row(rel_options, row[1:])))
        else:
            rows = through._base_manager.using(using).filter(**{f"{source_col}__in": chunk})
            for link in rows.select_related(target_col):
                out[getattr(link, f"{source_col}_id")].append(
                    [encode_value(None, v) for v in getattr(link, target_col).natural_key()]
                )
    for keys in out.values():
        keys.sort(key=repr)
    return out


def chunked(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
