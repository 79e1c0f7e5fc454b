"""Reading every registered row for a full Data Pull (source side, no HTTP here).

Rows are paged by primary key (keyset, never OFFSET), so each page costs the
same whatever the table size. The snapshot starts by recording the feed
position: every event up to it is committed (outbox.sequence), so the rows read
afterwards reflect at least that state, and a target that continues the feed
from that position misses nothing. Events after it may already be in the
rows read; replaying them is harmless because applying is idempotent.

Rows of models with ``file_fields`` also carry each named file's size,
SHA-256 and download token (files.py), so a target fetches only what differs.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import threading
import time
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from itertools import islice, repeat
from json.encoder import encode_basestring_ascii as _esc
from operator import methodcaller
from typing import Any, Literal

from django.db import connections, models

from . import files, outbox, registry
from .keys import max_params, model_order, resolve_keys
from .registry import Key, ModelOptions
from .serialization import (
    PROTOCOL_VERSION,
    decode_value,
    encode_value,
    key_of_row,
    normalize_key,
    payloads_from_db,
)

# Digests (see README, "Wire protocol"): a row's canonical text is the JSON of
# ``[key, data]`` as a snapshot page sends them, with sorted object keys, no
# whitespace and non-ASCII characters escaped; its hash is the first 128 bits of
# BLAKE2b of that text (digest_size=16, big-endian); its bucket is the CRC-32 of
# its key's canonical text modulo the number of buckets. A bucket's digest is the
# number of its rows and the sum of their hashes modulo 2**128: it does not depend
# on the order the rows were read in, so each side reads in its own primary-key order.
DIGEST_VERSION = 1
MAX_BUCKETS = 16384  # an ``only`` bitmap of 2,731 characters at most
DIGEST_SECONDS = 2.0  # a digest request answers after about this long
_ENCODE = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, check_circular=False
).encode
_MASK = (1 << 128) - 1
_TEXT_CHUNK = 5000  # rows whose canonical texts are built at once


def _fragment(field: Any, value: Any) -> str:
    """The canonical text of one value as a page would send it."""
    if value.__class__ is str and (field is None or _plain_text(field)):
        return _esc(value)
    return _ENCODE(value if field is None else encode_value(field, value))


def _fragments(field: Any, values: Sequence[Any]) -> list[str]:
    """``_fragment`` of a column of raw values of ``field`` (None: a plain text column)."""
    if field is None or _plain_text(field):
        try:
            return list(map(_esc, values))  # every value a string: the usual case
        except TypeError:
            return [_esc(v) if v.__class__ is str else _ENCODE(v) for v in values]
    return [_ENCODE(encode_value(field, v)) for v in values]


def canonical_key(key: Sequence[Any]) -> str:
    return _ENCODE(list(key))


def canonical_row(key: Sequence[Any], data: dict[str, Any]) -> str:
    return _ENCODE([list(key), data])


def bucket_of(key_text: str, buckets: int) -> int:
    return zlib.crc32(key_text.encode()) % buckets


def _in_buckets(
    items: Sequence[Any], keys: Sequence[str], buckets: int, wanted: frozenset[int]
) -> list[Any]:
    """The items whose key text (same position) falls in one of the ``wanted`` buckets."""
    where = map(buckets.__rmod__, map(zlib.crc32, map(str.encode, keys)))
    return [item for item, b in zip(items, where) if b in wanted]


def _texts_of(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    return (
        [canonical_key(r["key"]) for r in rows],
        [canonical_row(r["key"], r["data"]) for r in rows],
    )


class DigestPage:
    """Rows counted and hashes summed per bucket, for a range of rows."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.counts = [0] * buckets
        self.sums = [0] * buckets
        self.last: Any = None
        self.more = False

    def add(self, keys: Sequence[str], texts: Sequence[str]) -> None:
        n = self.buckets
        counts, sums = self.counts, self.sums
        # Built-in functions mapped over the page: no Python call per row but the loop.
        where = map(n.__rmod__, map(zlib.crc32, map(str.encode, keys)))
        hashes = map(int.from_bytes, map(_digest, map(_blake, map(str.encode, texts))), _BIG)
        for b, h in zip(where, hashes):
            counts[b] += 1
            sums[b] += h

    def merge(self, wire: Any) -> None:
        """Add a page's ``digests`` as received (ValueError if malformed)."""
        if not isinstance(wire, list):
            raise ValueError("digests is not a list")
        for item in wire:
            b, count, total = item
            if not (0 <= b < self.buckets) or count < 0:
                raise ValueError(f"bad digest entry {item!r}")
            self.counts[b] += int(count)
            self.sums[b] += int(total, 16)

    def to_wire(self) -> list[list[Any]]:
        return [
            [b, count, f"{self.sums[b] & _MASK:032x}"]
            for b, count in enumerate(self.counts)
            if count
        ]

    def differing(self, other: DigestPage) -> list[int]:
        """Buckets whose row count or hash sum differ."""
        return [
            b
            for b in range(self.buckets)
            if self.counts[b] != other.counts[b] or (self.sums[b] - other.sums[b]) & _MASK
        ]


_blake = partial(hashlib.blake2b, digest_size=16)
_digest = methodcaller("digest")
_BIG: repeat[Literal["big"]] = repeat("big")


def encode_buckets(wanted: Iterable[int], buckets: int) -> str:
    """A set of buckets as the ``only`` parameter: a bitmap (bucket i is bit i % 8 of
    byte i // 8), base64url without padding."""
    bits = bytearray((buckets + 7) // 8)
    for b in wanted:
        bits[b // 8] |= 1 << (b % 8)
    return base64.urlsafe_b64encode(bytes(bits)).decode("ascii").rstrip("=")


def decode_buckets(text: str, buckets: int) -> frozenset[int]:
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if len(raw) != (buckets + 7) // 8:
        raise ValueError(f"'only' must be a bitmap of {buckets} buckets")
    wanted = frozenset(i for i in range(buckets) if raw[i // 8] >> (i % 8) & 1)
    return wanted


def start(using: str, models: Sequence[str] | None = None) -> dict[str, Any]:
    """The snapshot's feed position, this source's identity and the models to read,
    parents first: every registered model, or those of ``models`` (a Target's selection)."""
    state = outbox.state(using)
    # Every event committed before now has a position up to the head (the
    # sequencer gives positions only after commit), so the rows read after
    # this reflect at least that state. When every event was pruned, the head
    # is the last pruned one (0 would be expired).
    position = outbox.head(using)
    registered = list(registry.get_registered_models())
    if models is not None:
        allowed = set(models)
        registered = [m for m in registered if m._meta.label_lower in allowed]
    ordered = model_order(registered)
    return {
        "protocol": PROTOCOL_VERSION,
        "source_id": state.source_id,
        "position": position,
        "models": [m._meta.label_lower for m in ordered],
        # For progress only: rows may come and go while the snapshot is read.
        "counts": {m._meta.label_lower: m._base_manager.using(using).count() for m in ordered},
        # This source answers digest requests (see ``digest``).
        "digests": DIGEST_VERSION,
    }


def _options(label: str) -> ModelOptions:
    options = registry.options_for_label(label)
    if options is None:
        raise LookupError(f"model {label!r} is not registered with changefeed_sync here")
    return options


def _check_buckets(options: ModelOptions, buckets: int) -> None:
    if not 1 <= buckets <= MAX_BUCKETS:
        raise ValueError(f"buckets must be between 1 and {MAX_BUCKETS}")
    if options.file_fields:
        raise ValueError(f"{options.label} has file fields: no digests, pull its rows")


def digest(label: str, after: str | None, limit: int, buckets: int, using: str) -> dict[str, Any]:
    """Bucket digests of up to ``limit`` rows after ``after`` (the rows ``page`` would send)."""
    options = _options(label)
    _check_buckets(options, buckets)
    with collection_paused():
        result = RowReader(options, using).digest_page(
            after, limit, buckets, seconds=DIGEST_SECONDS
        )
    return {
        "protocol": PROTOCOL_VERSION,
        "model": label,
        "buckets": buckets,
        "digests": result.to_wire(),
        "next": str(result.last) if result.last is not None else (after or ""),
        "more": result.more,
    }


def page(
    label: str,
    after: str | None,
    limit: int,
    using: str,
    buckets: int | None = None,
    only: str | None = None,
    *,
    target: str | None = None,
) -> dict[str, Any]:
    """Rows after ``after``; with ``buckets`` and ``only``, just the rows of those buckets.
    File tokens of the rows work for ``target`` only, when given."""
    options = _options(label)
    with collection_paused():
        if buckets is None:
            rows, last, more = RowReader(options, using).page(after, limit)
        else:
            _check_buckets(options, buckets)
            wanted = decode_buckets(only or "", buckets)
            rows, last, more = RowReader(options, using).page_in_buckets(
                after, limit, buckets, wanted
            )
    if options.file_fields:
        files.describe(options, rows, target)
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


class _Link:
    """A synced foreign key as a row reader sees it: which column holds it, and what
    to read from the related rows (the parts of our natural key that go through it,
    then the related row's own natural key, which is the foreign key's wire value)."""

    def __init__(self, fk: Any, rel: ModelOptions | None, column: int) -> None:
        self.fk = fk
        self.rel = rel
        self.column = column
        self.to = fk.target_field.attname
        self.sub: list[str] = []  # lookups on the related model, for our natural key
        self.sub_fields: list[Any] = []
        self.nat = list(rel.lookups) if rel is not None else []
        self.nat_text = rel is not None and all(_plain_text(f) for f in rel.key_fields)


class RowReader:
    """Rows of one registered model in wire form, ``{"key": [...], "data": {...}}``.

    The same payloads as ``serialization.payloads_from_db`` (which it uses for models
    with many-to-many fields or foreign keys to unregistered models), read without
    joins: one query on the model's own table per page (keyset on the primary key) or
    per chunk of keys (the natural key's local columns, which its unique index
    covers), plus one small query per foreign key for the related rows' natural keys.
    Without joins, no plan can turn a page into a scan of the whole table (PostgreSQL
    did, on tables not analyzed yet). Text columns skip the per-value encode/decode
    calls: the snapshot's source and the pull's target both read every row."""

    def __init__(self, options: ModelOptions, using: str) -> None:
        self.options = options
        self.using = using
        self.fks = [(fk, registry.get_options(fk.related_model)) for fk in options.fk_fields]
        self.n = len(options.lookups)
        self.text_key = all(_plain_text(f) for f in options.key_fields)
        plain = list(options.plain_fields)
        self.columns = [
            "pk",
            *(f.attname for f in plain),
            *(fk.attname for fk in options.fk_fields),
        ]
        self.plain = [(f.name, i, None if _plain_text(f) else f) for i, f in enumerate(plain, 1)]
        self.links = [_Link(fk, rel, 1 + len(plain) + j) for j, (fk, rel) in enumerate(self.fks)]
        by_name = {link.fk.name: (j, link) for j, link in enumerate(self.links)}
        plain_at = {f.name: (i, f) for i, f in enumerate(plain, 1)}
        # Where each natural-key part comes from: (column, -1, 0) for a local column,
        # (column, j, i) for part i of what self.links[j] reads from the related rows.
        self.key_parts: list[tuple[int, int, int]] = []
        self.heads: list[tuple[str, int, Any]] = []  # local filter: lookup, column, field
        fast = not options.m2m_fields and all(rel is not None for _, rel in self.fks)
        for path, leaf in zip(options.natural_key, options.key_fields, strict=True):
            head, _, rest = path.partition(".")
            if rest and head in by_name:
                j, link = by_name[head]
                link.sub.append(rest.replace(".", "__"))
                link.sub_fields.append(leaf)
                self.key_parts.append((link.column, j, len(link.sub) - 1))
                if all(h[1] != link.column for h in self.heads):
                    self.heads.append((link.fk.attname, link.column, None))
            elif not rest and head in plain_at:
                column, f = plain_at[head]
                self.key_parts.append((column, -1, 0))
                self.heads.append((f.attname, column, f))
            else:  # a key through something not synced: leave it to the general path
                fast = False
        # Per local key column: the positions of the key parts it is made of, and the
        # field to decode a received part with (None: used as it is).
        self.head_plan = [
            (
                column,
                tuple(i for i, (c, _, _) in enumerate(self.key_parts) if c == column),
                None if field is None or _plain_text(field) else field,
            )
            for _, column, field in self.heads
        ]
        self.link_subs = [
            (j, tuple(i for i, (c, jj, _) in enumerate(self.key_parts) if jj == j))
            for j, link in enumerate(self.links)
            if link.sub
        ]
        self.fast = fast

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

    def _related(self, rows: Sequence[Sequence[Any]]) -> list[dict[Any, tuple[Any, ...]]]:
        """Per foreign key: its column value -> (our key's parts through it, its natural key)."""
        maps: list[dict[Any, tuple[Any, ...]]] = []
        limit = max_params(self.using)
        for link in self.links:
            found: dict[Any, tuple[Any, ...]] = {}
            values = {row[link.column] for row in rows} - {None}
            manager = link.fk.related_model._base_manager.using(self.using)
            for chunk in _chunks(sorted(values, key=repr), limit):
                query = manager.filter(**{f"{link.to}__in": chunk})
                for related in query.values_list(link.to, *link.sub, *link.nat):
                    found[related[0]] = related[1:]
            maps.append(found)
        return maps

    def _payload(
        self, row: Sequence[Any], maps: list[dict[Any, tuple[Any, ...]]]
    ) -> tuple[Key, dict[str, Any]] | None:
        """(natural key, data) of a row; None if it points at a row that is not there."""
        related = self._hits(row, maps)
        if related is None:
            return None
        parts = [
            row[column] if j < 0 else (None if related[j] is None else related[j][i])  # type: ignore[index]
            for column, j, i in self.key_parts
        ]
        return self.key_from_db(parts), self._data(row, related)

    def _hits(
        self, row: Sequence[Any], maps: list[dict[Any, tuple[Any, ...]]]
    ) -> list[tuple[Any, ...] | None] | None:
        """Per foreign key, what was read of the row it points at (None: null)."""
        related: list[tuple[Any, ...] | None] = []
        for link, found in zip(self.links, maps, strict=True):
            value = row[link.column]
            if value is None:
                related.append(None)
                continue
            hit = found.get(value)
            if hit is None:
                return None
            related.append(hit)
        return related

    def _data(self, row: Sequence[Any], related: list[tuple[Any, ...] | None]) -> dict[str, Any]:
        data = {name: row[i] if f is None else encode_value(f, row[i]) for name, i, f in self.plain}
        for link, hit in zip(self.links, related, strict=True):
            if hit is None:
                data[link.fk.name] = None
                continue
            nat = hit[len(link.sub) :]
            assert link.rel is not None
            data[link.fk.name] = list(nat) if link.nat_text else list(key_of_row(link.rel, nat))
        return data

    def _ordered(self, after: str | None) -> Any:
        pk_field = self.options.model._meta.pk
        assert pk_field is not None
        ordered = self.options.model._base_manager.using(self.using).order_by("pk")
        if after not in (None, ""):
            ordered = ordered.filter(pk__gt=pk_field.to_python(after))
        return ordered

    def page(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], Any, bool]:
        """Up to ``limit`` rows after primary key ``after``, by keyset; (rows, last pk, more)."""
        ordered = self._ordered(after)
        if not self.fast:
            pks = list(ordered.values_list("pk", flat=True)[: limit + 1])
            payloads = payloads_from_db(self.options, pks[:limit], self.using)
            rows = [payloads[pk] for pk in pks[:limit] if pk in payloads]
            return rows, (pks[:limit][-1] if pks[:limit] else None), len(pks) > limit
        found = list(ordered.values_list(*self.columns)[: limit + 1])
        more = len(found) > limit
        found = found[:limit]
        return self._rows(found, self._related(found)), (found[-1][0] if found else None), more

    def _rows(
        self, found: Sequence[Sequence[Any]], maps: list[dict[Any, tuple[Any, ...]]]
    ) -> list[dict[str, Any]]:
        rows = []
        for row in found:
            payload = self._payload(row, maps)
            if payload is not None:
                rows.append({"key": list(payload[0]), "data": payload[1]})
        return rows

    # ------------------------------------------------------------ digests

    def digest_page(
        self,
        after: str | None,
        limit: int,
        buckets: int,
        out: DigestPage | None = None,
        seconds: float | None = None,
    ) -> DigestPage:
        """Bucket digests of up to ``limit`` rows after primary key ``after`` (keyset),
        added to ``out`` if given; its ``last`` and ``more`` say where the reading
        stopped. Read a chunk of rows at a time (memory stays that of a chunk), and
        stop early once ``seconds`` have passed (a request stays short)."""
        out = out or DigestPage(buckets)
        deadline = None if seconds is None else time.monotonic() + seconds
        out.more = False
        chunks = self._rows_after(after, limit, ["pk"] if not self.fast else self.columns)
        try:
            for found, more in chunks:
                if not self.fast:
                    pks = [row[0] for row in found]
                    payloads = payloads_from_db(self.options, pks, self.using)
                    out.add(*_texts_of([payloads[pk] for pk in pks if pk in payloads]))
                else:
                    maps = self._related(found)
                    texts = self._texts(found, maps)
                    out.add(*(texts if texts is not None else _texts_of(self._rows(found, maps))))
                out.more = more
                if found:
                    out.last = found[-1][0]
                if more and deadline is not None and time.monotonic() > deadline:
                    break
        finally:
            chunks.close()
        return out

    def _streams(self) -> bool:
        """Whether to read with one query a chunk at a time: on PostgreSQL with
        server-side cursors only. MySQL's driver would hold a whole result in memory;
        a long read on SQLite (rollback journal) would hold back every writer's commit,
        and its keyset pages cost nothing more."""
        connection = connections[self.using]
        return connection.vendor == "postgresql" and not connection.settings_dict.get(
            "DISABLE_SERVER_SIDE_CURSORS"
        )

    def _rows_after(
        self, after: str | None, limit: int, columns: Sequence[str]
    ) -> Generator[tuple[list[tuple[Any, ...]], bool], None, None]:
        """Up to ``limit`` rows (``columns``, the first being the primary key) after
        primary key ``after``, in its order, a chunk at a time with whether more rows
        follow the chunk. One query read as it goes where that streams (a page query
        per chunk would cost PostgreSQL a scan and a sort each on an unanalyzed table),
        keyset pages of a chunk otherwise."""
        if not self._streams():
            read = 0
            while read < limit:
                step = min(_TEXT_CHUNK, limit - read)
                found = list(self._ordered(after).values_list(*columns)[: step + 1])
                more = len(found) > step
                del found[step:]
                read += len(found)
                yield found, more
                if not more:
                    return
                after = str(found[-1][0])
            return
        rows = self._ordered(after).values_list(*columns)[: limit + 1].iterator(_TEXT_CHUNK)
        try:
            read = 0
            chunk = list(islice(rows, min(_TEXT_CHUNK, limit)))
            while chunk:
                read += len(chunk)
                # At the limit, the one row read past it says whether more follow.
                following = list(islice(rows, min(_TEXT_CHUNK, limit - read) or 1))
                yield chunk, bool(following)
                if read >= limit:
                    return
                chunk = following
        finally:
            rows.close()

    def _all_rows(self, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        """Every row (``columns``, the first being the primary key), a chunk at a time,
        in no particular order where one query streams (``_streams``), else by keyset."""
        if not self._streams():
            for chunk, _ in self._rows_after(None, 2**62, columns):
                yield chunk
            return
        manager = self.options.model._base_manager.using(self.using)
        rows = manager.values_list(*columns).iterator(chunk_size=_TEXT_CHUNK)
        try:
            while chunk := list(islice(rows, _TEXT_CHUNK)):
                yield chunk
        finally:
            rows.close()

    def digest_all(self, buckets: int) -> DigestPage:
        """Bucket digests of every row (what ``digest_page`` adds up over all pages)."""
        out = DigestPage(buckets)
        if not self.fast:
            for chunk in self._all_rows(["pk"]):
                pks = [row[0] for row in chunk]
                payloads = payloads_from_db(self.options, pks, self.using)
                out.add(*_texts_of([payloads[pk] for pk in pks if pk in payloads]))
            return out
        for found in self._all_rows(self.columns):
            maps = self._related(found)
            texts = self._texts(found, maps)
            out.add(*(texts if texts is not None else _texts_of(self._rows(found, maps))))
        return out

    def pks_in_buckets(self, buckets: int, wanted: frozenset[int]) -> Iterator[list[Any]]:
        """Primary keys of the rows whose key falls in one of the ``wanted`` buckets,
        a chunk at a time."""
        if not self.fast:
            for chunk in self._all_rows(["pk"]):
                pks = [row[0] for row in chunk]
                payloads = payloads_from_db(self.options, pks, self.using)
                pairs = [(pk, payloads[pk]["key"]) for pk in pks if pk in payloads]
                keys = [canonical_key(key) for _, key in pairs]
                yield [pk for pk, _ in _in_buckets(pairs, keys, buckets, wanted)]
            return
        for found in self._all_rows(self.columns):
            maps = self._related(found)
            texts = self._texts(found, maps, keys_only=True)
            if texts is None:
                pairs = [(r[0], p[0]) for r in found if (p := self._payload(r, maps)) is not None]
                keys = [canonical_key(key) for _, key in pairs]
                yield [pk for pk, _ in _in_buckets(pairs, keys, buckets, wanted)]
            else:
                yield [r[0] for r in _in_buckets(found, texts[0], buckets, wanted)]

    def page_in_buckets(
        self, after: str | None, limit: int, buckets: int, wanted: frozenset[int]
    ) -> tuple[list[dict[str, Any]], Any, bool]:
        """Like ``page``, but only the rows whose key falls in one of the ``wanted``
        buckets: reads on until about ``limit`` rows were found or ten times ``limit``
        rows were read (so a request stays short whatever the table)."""
        out: list[dict[str, Any]] = []
        last: Any = None
        more = False
        chunks = self._rows_after(after, 10 * limit, ["pk"] if not self.fast else self.columns)
        try:
            for found, following in chunks:
                more = following
                if not self.fast:
                    pks = [row[0] for row in found]
                    payloads = payloads_from_db(self.options, pks, self.using)
                    rows = [payloads[pk] for pk in pks if pk in payloads]
                    out.extend(_in_buckets(rows, _texts_of(rows)[0], buckets, wanted))
                else:
                    maps = self._related(found)
                    texts = self._texts(found, maps, keys_only=True)
                    if texts is None:
                        rows = self._rows(found, maps)
                        out.extend(_in_buckets(rows, _texts_of(rows)[0], buckets, wanted))
                    else:
                        picked = _in_buckets(found, texts[0], buckets, wanted)
                        out.extend(self._rows(picked, maps))
                if found:
                    last = found[-1][0]
                if len(out) >= limit:
                    break
        finally:
            chunks.close()
        return out, last, more

    def _texts(
        self,
        found: Sequence[Sequence[Any]],
        maps: list[dict[Any, tuple[Any, ...]]],
        keys_only: bool = False,
    ) -> tuple[list[str], list[str]] | None:
        """(key texts, row texts) of raw rows of the fast path, column by column: the
        same strings as ``canonical_key`` / ``canonical_row`` of their payloads (a test
        holds them equal). None when a row points at a row that is not there (such
        rows are left out of pages): the caller then goes through the payloads."""
        if not found:
            return [], []
        columns = list(zip(*found))
        options = self.options
        # Per foreign key: column value -> (fragments of our key parts through it, its wire value).
        frags: list[dict[Any, tuple[list[str], str]]] = []
        for j, (link, hits) in enumerate(zip(self.links, maps, strict=True)):
            values = set(columns[link.column])
            values.discard(None)
            if not values <= hits.keys():
                return None
            parts = [
                (i, options.key_fields[p]) for p, (_, jj, i) in enumerate(self.key_parts) if jj == j
            ]
            table: dict[Any, tuple[list[str], str]] = {}
            for value in values:
                hit = hits[value]
                nat = hit[len(link.sub) :]
                assert link.rel is not None
                wire = list(nat) if link.nat_text else list(key_of_row(link.rel, nat))
                table[value] = ([_fragment(f, hit[i]) for i, f in parts], _ENCODE(wire))
            frags.append(table)
        local: dict[int, list[str]] = {}  # column -> its values' texts, made once
        key_pieces: list[Any] = []
        taken: dict[int, int] = {}  # link -> key parts through it used so far
        for p, (column, j, _) in enumerate(self.key_parts):
            key_pieces.append(repeat("," if p else "["))
            if j < 0:
                local[column] = _fragments(options.key_fields[p], columns[column])
                key_pieces.append(local[column])
            else:
                n = taken.get(j, 0)
                taken[j] = n + 1
                table = frags[j]
                key_pieces.append(
                    ["null" if v is None else table[v][0][n] for v in columns[self.links[j].column]]
                )
        key_pieces.append(repeat("]"))
        keys = list(map("".join, zip(*key_pieces)))
        if keys_only:
            return keys, []
        pieces: list[Any] = [repeat("["), keys]
        by_name: dict[str, list[str]] = {}
        for name, i, f in self.plain:
            text = local.get(i) if f is None else None  # a plain text key part: the same texts
            by_name[name] = text if text is not None else _fragments(f, columns[i])
        for j, link in enumerate(self.links):
            table = frags[j]
            by_name[link.fk.name] = [
                "null" if v is None else table[v][1] for v in columns[link.column]
            ]
        separator = ",{"
        for name in sorted(by_name):
            pieces += [repeat(separator + _esc(name) + ":"), by_name[name]]
            separator = ","
        pieces.append(repeat("}]" if by_name else ",{}]"))
        return keys, list(map("".join, zip(*pieces)))

    def by_keys(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, dict[str, Any]]]:
        """Natural key -> (pk, data) of the rows with these keys.

        The parts of the keys that go through a foreign key are first resolved to
        that key's column values (a small query per foreign key); then the model's
        own table is read by its local key columns, each filtered with ``IN`` in
        chunks, and the exact combinations are matched here."""
        options = self.options
        wanted = set(keys)
        found: dict[Key, tuple[Any, dict[str, Any]]] = {}
        if not wanted:
            return found
        if not self.fast:
            existing = resolve_keys(options, wanted, self.using)
            payloads = payloads_from_db(options, list(existing.values()), self.using)
            return {k: (pk, payloads[pk]["data"]) for k, pk in existing.items() if pk in payloads}
        limit = max_params(self.using)
        # Our key's parts through each foreign key -> that foreign key's column value.
        via: dict[int, dict[tuple[Any, ...], Any]] = {}
        for j, positions in self.link_subs:
            link = self.links[j]
            subs = {tuple(k[i] for i in positions) for k in wanted}
            manager = link.fk.related_model._base_manager.using(self.using)
            text = [_plain_text(f) for f in link.sub_fields]
            resolved: dict[tuple[Any, ...], Any] = {}
            for chunk in _key_chunks(subs, len(positions), limit):
                filters = {
                    f"{lookup}__in": {
                        sub[i] if text[i] else decode_value(field, sub[i]) for sub in chunk
                    }
                    for i, (lookup, field) in enumerate(zip(link.sub, link.sub_fields, strict=True))
                }
                for related in manager.filter(**filters).values_list(link.to, *link.sub):
                    sub = tuple(
                        v if text[i] else encode_value(f, v)
                        for i, (f, v) in enumerate(zip(link.sub_fields, related[1:], strict=True))
                    )
                    resolved[sub] = related[0]
            via[link.column] = resolved
        # Each wanted key as the values of the local key columns.
        local: dict[tuple[Any, ...], Key] = {}
        for key in wanted:
            heads = []
            for column, positions, decode in self.head_plan:
                if column in via:
                    value = via[column].get(tuple([key[i] for i in positions]))
                    if value is None:
                        break  # its related row is not here, so neither is it
                    heads.append(value)
                elif decode is None:
                    heads.append(key[positions[0]])
                else:
                    heads.append(decode_value(decode, key[positions[0]]))
            else:
                local[tuple(heads)] = key
        manager = options.model._base_manager.using(self.using)
        lookups = [lookup for lookup, _, _ in self.heads]
        head_columns = [column for _, column, _ in self.heads]
        for chunk in _key_chunks(set(local), len(lookups), limit):
            filters = {
                f"{lookup}__in": {head[i] for head in chunk} for i, lookup in enumerate(lookups)
            }
            rows = list(manager.filter(**filters).values_list(*self.columns))
            maps = self._related(rows)
            for row in rows:
                # Rows are matched by their local key columns: no need to rebuild the key.
                matched = local.get(tuple([row[c] for c in head_columns]))
                if matched is None:
                    continue
                related = self._hits(row, maps)
                if related is not None:
                    found[matched] = (row[0], self._data(row, related))
        return found


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _key_chunks(keys: set[Key], parts: int, max_params: int) -> Iterator[list[Key]]:
    """Keys in chunks for ``IN`` filters, one per key part: sorted, so that keys sharing
    leading parts (same country, same language) share a chunk, and cut where the
    chunk would pass the bind-parameter limit or where the combinations of its parts
    would be more than twice its keys (each combination may match a row to skip)."""
    distinct = [len({key[i] for key in keys}) for i in range(parts)]
    combinations = 1
    for size in distinct:
        combinations *= size
    if sum(distinct) <= max_params and combinations <= 2 * len(keys) + 16:
        yield list(keys)  # the usual page: one chunk
        return
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
