"""Digests of rows: their canonical texts, buckets and bucket sums, as both sides compute them.

A re-pull compares the source's digests of each bucket of rows with the target's
own and transfers only the rows of the buckets that differ (see README, "Wire
protocol"): a row's canonical text is the JSON of ``[key, data]`` as a snapshot
page sends them, with sorted object keys, no whitespace and non-ASCII characters
escaped; its hash is the first 128 bits of BLAKE2b of that text (digest_size=16,
big-endian); its bucket is the CRC-32 of its key's canonical text modulo the
number of buckets. A bucket's digest is the number of its rows and the sum of
their hashes modulo 2**128: it does not depend on the order the rows were read
in, so each side reads in its own primary-key order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import repeat
from json.encoder import encode_basestring_ascii as _esc
from operator import methodcaller
from typing import Any, Literal

from .rows import RowReader, plain_text
from .serialization import encode_value, key_of_row, payloads_from_db

DIGEST_VERSION = 1
MAX_BUCKETS = 16384  # an ``only`` bitmap of 2,731 characters at most
_ENCODE = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, check_circular=False
).encode
_MASK = (1 << 128) - 1
_blake = partial(hashlib.blake2b, digest_size=16)
_digest = methodcaller("digest")
_BIG: repeat[Literal["big"]] = repeat("big")


def _fragment(field: Any, value: Any) -> str:
    """The canonical text of one value as a page would send it."""
    if value.__class__ is str and (field is None or plain_text(field)):
        return _esc(value)
    return _ENCODE(value if field is None else encode_value(field, value))


def _fragments(field: Any, values: Sequence[Any]) -> list[str]:
    """``_fragment`` of a column of raw values of ``field`` (None: a plain text column)."""
    if field is None or plain_text(field):
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
    """The bucket of a row whose key's canonical text is ``key_text``."""
    return zlib.crc32(key_text.encode()) % buckets


def _in_buckets(
    items: Sequence[Any], keys: Sequence[str], buckets: int, wanted: frozenset[int]
) -> list[Any]:
    """The items whose key text (same position) falls in one of the ``wanted`` buckets."""
    where = map(bucket_of, keys, repeat(buckets))
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
        counts, sums = self.counts, self.sums
        # Mapped over the page: the loop is the only other Python code run per row.
        where = map(bucket_of, keys, repeat(self.buckets))
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


class DigestReader(RowReader):
    """A RowReader that also reads its model's rows as bucket digests, and pages of
    only the rows of some buckets: what a re-pull compares and then transfers."""

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
        frags = self._link_texts(columns, maps)
        if frags is None:
            return None
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

    def _link_texts(
        self, columns: Sequence[Sequence[Any]], maps: list[dict[Any, tuple[Any, ...]]]
    ) -> list[dict[Any, tuple[list[str], str]]] | None:
        """Per foreign key: its column value -> (the texts of our key parts through it,
        the text of its wire value); None when a row points at a row that is not there."""
        frags: list[dict[Any, tuple[list[str], str]]] = []
        for j, (link, hits) in enumerate(zip(self.links, maps, strict=True)):
            values = set(columns[link.column])
            values.discard(None)
            if not values <= hits.keys():
                return None
            parts = [
                (i, self.options.key_fields[p])
                for p, (_, jj, i) in enumerate(self.key_parts)
                if jj == j
            ]
            table: dict[Any, tuple[list[str], str]] = {}
            for value in values:
                hit = hits[value]
                nat = hit[len(link.sub) :]
                assert link.rel is not None
                wire = list(nat) if link.nat_text else list(key_of_row(link.rel, nat))
                table[value] = ([_fragment(f, hit[i]) for i, f in parts], _ENCODE(wire))
            frags.append(table)
        return frags
