"""Reading every registered row for a full Data Pull (source side, no HTTP here).

Rows are paged by primary key (keyset, never OFFSET), so each page costs the
same whatever the table size. The snapshot starts by recording the feed
position: every event up to it is committed (outbox.lock), so the rows read
afterwards reflect at least that state, and a target that continues the feed
from that position misses nothing. Events after it may already be in the
rows read; replaying them is harmless because applying is idempotent.

Rows of models with ``file_fields`` also carry each named file's size,
SHA-256 and download token (files.py), so a target fetches only what differs.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.db import models
from django.db.models import Max

from . import files, registry
from .apply import _max_params, model_order, resolve_keys
from .models import Event
from .registry import Key, ModelOptions
from .serialization import (
    PROTOCOL_VERSION,
    decode_value,
    encode_value,
    key_of_row,
    normalize_key,
    payloads_from_db,
)


def start(using: str) -> dict[str, Any]:
    position = Event.objects.using(using).aggregate(m=Max("id"))["m"] or 0
    ordered = model_order(registry.get_registered_models())
    return {
        "protocol": PROTOCOL_VERSION,
        "position": position,
        "models": [m._meta.label_lower for m in ordered],
        # For progress only: rows may come and go while the snapshot is read.
        "counts": {m._meta.label_lower: m._base_manager.using(using).count() for m in ordered},
    }


def page(label: str, after: str | None, limit: int, using: str) -> dict[str, Any]:
    options = registry.options_for_label(label)
    if options is None:
        raise LookupError(f"model {label!r} is not registered with changefeed_sync here")
    with collection_paused():
        rows, last, more = RowReader(options, using).page(after, limit)
    if options.file_fields:
        files.describe(options, rows)
    return {
        "protocol": PROTOCOL_VERSION,
        "model": label,
        "rows": rows,
        "next": str(last) if last is not None else (after or ""),
        "more": more,
    }


# ------------------------------------------------------------------ rows in wire form

_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a page of rows is built or applied.

    A page allocates tens of thousands of containers that all live until the page is
    done, so the collector runs again and again over them (and, when they reach the
    oldest generation, over every object of the process) for nothing: measured, about
    40% of the time of a snapshot page. Pages are short; collection resumes between
    them, so memory stays bounded. Counted across threads: the collector is enabled
    again when the last pause ends, and only if it was enabled before the first.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def _plain_text(f: Any) -> bool:
    """A text column whose database value is already its wire form (encode_value and
    decode_value leave a str as it is), so rows can skip both per value."""
    return (
        isinstance(f, models.CharField | models.TextField)
        and type(f).to_python in (models.CharField.to_python, models.TextField.to_python)
        and not hasattr(f, "from_db_value")
    )


class RowReader:
    """Rows of one registered model in wire form, ``{"key": [...], "data": {...}}``,
    read with one query per page or chunk of keys. The same payloads as
    ``serialization.payloads_from_db`` (which it uses for models with many-to-many
    fields or foreign keys to unregistered models), without its per-value calls for
    text columns: the snapshot's source and the pull's target both read every row."""

    def __init__(self, options: ModelOptions, using: str) -> None:
        self.options = options
        self.using = using
        self.fks = [(fk, registry.get_options(fk.related_model)) for fk in options.fk_fields]
        self.fast = not options.m2m_fields and all(rel is not None for _, rel in self.fks)
        self.n = len(options.lookups)
        self.columns = ["pk", *options.lookups, *(f.attname for f in options.plain_fields)]
        for fk, rel in self.fks:
            self.columns.append(fk.attname)
            if rel is not None:
                self.columns.extend(f"{fk.name}__{lookup}" for lookup in rel.lookups)
        self.text_key = all(_plain_text(f) for f in options.key_fields)
        # Positions in a row of ``columns``: plain values, then per foreign key its
        # column and the related row's natural key.
        at = 1 + self.n
        self.plain = []
        for f in options.plain_fields:
            self.plain.append((f.name, at, None if _plain_text(f) else f))
            at += 1
        self.fk_at = []
        for fk, rel in self.fks:
            parts = len(rel.lookups) if rel is not None else 0
            text = rel is not None and all(_plain_text(f) for f in rel.key_fields)
            self.fk_at.append((fk.name, at, at + 1, at + 1 + parts, rel, text))
            at += 1 + parts

    # ------------------------------------------------------------ keys

    def key_from_db(self, values: Sequence[Any]) -> Key:
        return tuple(values) if self.text_key else key_of_row(self.options, values)

    def key_from_wire(self, raw: Any) -> Key:
        """A received natural key in the form ``key_from_db`` gives (ValueError if malformed)."""
        if self.text_key and type(raw) is list and len(raw) == self.n:
            try:
                "".join(raw)  # every part a str
            except TypeError:
                pass
            else:
                return tuple(raw)
        return normalize_key(self.options, raw)

    # ------------------------------------------------------------ rows

    def _data(self, row: Sequence[Any]) -> dict[str, Any]:
        data = {name: row[i] if f is None else encode_value(f, row[i]) for name, i, f in self.plain}
        for name, i, start, end, rel, text in self.fk_at:
            if row[i] is None:
                data[name] = None
            elif text:
                data[name] = list(row[start:end])
            else:
                assert rel is not None
                data[name] = list(key_of_row(rel, row[start:end]))
        return data

    def page(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], Any, bool]:
        """Up to ``limit`` rows after primary key ``after``, by keyset; (rows, last pk, more)."""
        options = self.options
        pk_field = options.model._meta.pk
        assert pk_field is not None
        ordered = options.model._base_manager.using(self.using).order_by("pk")
        if after not in (None, ""):
            ordered = ordered.filter(pk__gt=pk_field.to_python(after))
        if not self.fast:
            pks = list(ordered.values_list("pk", flat=True)[: limit + 1])
            payloads = payloads_from_db(options, pks[:limit], self.using)
            rows = [payloads[pk] for pk in pks[:limit] if pk in payloads]
            return rows, (pks[:limit][-1] if pks[:limit] else None), len(pks) > limit
        found = list(ordered.values_list(*self.columns)[: limit + 1])
        more = len(found) > limit
        found = found[:limit]
        rows = []
        n = self.n
        for row in found:
            key = self.key_from_db(row[1 : 1 + n])
            rows.append({"key": list(key), "data": self._data(row)})
        return rows, (found[-1][0] if found else None), more

    def by_keys(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, dict[str, Any]]]:
        """Natural key -> (pk, data) of the rows with these keys; one query per chunk,
        each key part filtered with ``IN`` and the exact combinations matched here."""
        options = self.options
        wanted = set(keys)
        found: dict[Key, tuple[Any, dict[str, Any]]] = {}
        if not wanted:
            return found
        if not self.fast:
            existing = resolve_keys(options, wanted, self.using)
            payloads = payloads_from_db(options, list(existing.values()), self.using)
            return {k: (pk, payloads[pk]["data"]) for k, pk in existing.items() if pk in payloads}
        manager = options.model._base_manager.using(self.using)
        parts = list(zip(options.lookups, options.key_fields, strict=True))
        n = self.n
        for chunk in _key_chunks(wanted, n, _max_params(self.using)):
            filters = {
                f"{lookup}__in": {k[i] if self.text_key else decode_value(f, k[i]) for k in chunk}
                for i, (lookup, f) in enumerate(parts)
            }
            chunk_set = set(chunk)
            for row in manager.filter(**filters).values_list(*self.columns):
                key = self.key_from_db(row[1 : 1 + n])
                if key in chunk_set:
                    found[key] = (row[0], self._data(row))
        return found


def _key_chunks(keys: set[Key], parts: int, max_params: int) -> Iterator[list[Key]]:
    """Keys in chunks for ``IN`` filters, one per key part: sorted, so that keys sharing
    leading parts (same country, same language) share a chunk, and cut where the
    chunk would pass the bind-parameter limit or where the combinations of its parts
    would be more than twice its keys (each combination may match a row to skip)."""
    try:
        ordered = sorted(keys)
    except TypeError:  # None or mixed types in some part
        ordered = sorted(keys, key=repr)
    chunk: list[Key] = []
    seen: list[set[Any]] = [set() for _ in range(parts)]
    for key in ordered:
        grown = [len(values) + (key[i] not in values) for i, values in enumerate(seen)]
        combinations = 1
        for size in grown:
            combinations *= size
        if chunk and (sum(grown) > max_params or combinations > 2 * (len(chunk) + 1) + 16):
            yield chunk
            chunk = []
            seen = [set() for _ in range(parts)]
        chunk.append(key)
        for i, values in enumerate(seen):
            values.add(key[i])
    if chunk:
        yield chunk
