"""Rows of registered models in wire form, read straight from the database.

Shared by both sides of the wire: the source serves snapshot pages with it
(source/snapshot.py), the target's pull reads its own rows with it to compare
them with the source's. Rows are paged by primary key (keyset, never OFFSET),
so each page costs the same whatever the table size. Digests of these rows
(their canonical texts and buckets) are digests.py's.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

from django.db import connections, models
from django.db.models import Q

from . import registry
from .keys import max_params, resolve_keys
from .registry import Key, ModelOptions
from .serialization import (
    chunked,
    decode_value,
    encode_value,
    key_of_row,
    normalize_key,
    payloads_from_db,
)

_READ_CHUNK = 5000  # rows read at once (and, for digests, whose texts are built at once)

_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False
#: Whether this process may pause the collector at all: only a process that does
#: nothing but the pull (``manage.py changefeed_pull``) says so. A pull started from
#: the admin runs in the web process, where a pause would stop collection for every
#: request thread too.
_pauses_allowed = False


def allow_collection_pauses() -> None:
    """Let ``collection_paused`` pause the collector in this process (call it only in a
    process of its own, such as a management command)."""
    global _pauses_allowed
    _pauses_allowed = True


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a page of rows is built or applied.

    A page allocates tens of thousands of containers that all live until the page is
    done, so the collector runs again and again over them (and, when they reach the
    oldest generation, over every object of the process) for nothing (measured once
    in bench/pull.py's pull process, with a switch that was not kept: a noticeable
    share of its CPU). Pages are short;
    collection resumes between them, so memory stays bounded. Counted across threads:
    the collector is enabled again when the last pause ends, and only if it was
    enabled before the first. It pauses every thread of the process, so it does
    nothing unless the process allowed it (``allow_collection_pauses``): the source's
    web process serves pages without it, and an admin-started pull runs without it.
    """
    global _gc_pauses, _gc_was_enabled
    if not _pauses_allowed:
        yield
        return
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


def plain_text(f: Any) -> bool:
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
        self.nat_text = rel is not None and all(plain_text(f) for f in rel.key_fields)


class RowReader:
    """Rows of one registered model in wire form, ``{"key": [...], "data": {...}}``.

    The same payloads as ``serialization.payloads_from_db`` (which it uses for models
    with many-to-many fields or foreign keys to unregistered models), read without
    joins: one query on the model's own table per page (keyset on the primary key) or
    per chunk of keys (the natural key's local columns, which its unique index
    covers), plus one small query per foreign key for the related rows' natural keys.
    Without joins, no plan can turn a page into a scan of the whole table (PostgreSQL
    did, on tables not analyzed yet). Text columns skip the per-value encode/decode
    calls: the snapshot's source and the pull's target both read every row.
    digests.DigestReader adds reading them as bucket digests.

    With ``row_filter`` (a Target's row filter, selection.py) only the rows matching it
    are read: the database applies it to every query on the model's own table, the
    keyset by primary key unchanged (a filter through a parent joins that parent's
    table by its primary key, for the rows of the page)."""

    def __init__(self, options: ModelOptions, using: str, row_filter: Q | None = None) -> None:
        self.options = options
        self.using = using
        self.row_filter = row_filter
        self.fks = [(fk, registry.get_options(fk.related_model)) for fk in options.fk_fields]
        self.n = len(options.lookups)
        self.text_key = all(plain_text(f) for f in options.key_fields)
        plain = list(options.plain_fields)
        self.columns = [
            "pk",
            *(f.attname for f in plain),
            *(fk.attname for fk in options.fk_fields),
        ]
        self.plain = [(f.name, i, None if plain_text(f) else f) for i, f in enumerate(plain, 1)]
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
                None if field is None or plain_text(field) else field,
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
            for chunk in chunked(sorted(values, key=repr), limit):
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

    def _table(self) -> Any:
        """The model's rows this reader reads: all, or those of its row filter."""
        rows = self.options.model._base_manager.using(self.using).all()
        return rows if self.row_filter is None else rows.filter(self.row_filter)

    def _ordered(self, after: str | None) -> Any:
        pk_field = self.options.model._meta.pk
        assert pk_field is not None
        ordered = self._table().order_by("pk")
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

    # ------------------------------------------------------------ in chunks, for digests

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
                step = min(_READ_CHUNK, limit - read)
                found = list(self._ordered(after).values_list(*columns)[: step + 1])
                more = len(found) > step
                del found[step:]
                read += len(found)
                yield found, more
                if not more:
                    return
                after = str(found[-1][0])
            return
        rows = self._ordered(after).values_list(*columns)[: limit + 1].iterator(_READ_CHUNK)
        try:
            read = 0
            chunk = list(islice(rows, min(_READ_CHUNK, limit)))
            while chunk:
                read += len(chunk)
                # At the limit, the one row read past it says whether more follow.
                following = list(islice(rows, min(_READ_CHUNK, limit - read) or 1))
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
        rows = self._table().values_list(*columns).iterator(chunk_size=_READ_CHUNK)
        try:
            while chunk := list(islice(rows, _READ_CHUNK)):
                yield chunk
        finally:
            rows.close()

    # ------------------------------------------------------------ by natural key

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
            if self.row_filter is not None:
                pks = list(existing.values())
                kept = {
                    pk
                    for chunk in chunked(pks, max_params(self.using))
                    for pk in self._table().filter(pk__in=chunk).values_list("pk", flat=True)
                }
                existing = {k: pk for k, pk in existing.items() if pk in kept}
            payloads = payloads_from_db(options, list(existing.values()), self.using)
            return {k: (pk, payloads[pk]["data"]) for k, pk in existing.items() if pk in payloads}
        limit = max_params(self.using)
        local = self._local_heads(wanted, self._via_links(wanted, limit))
        manager = self._table()
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

    def _via_links(self, wanted: set[Key], limit: int) -> dict[int, dict[tuple[Any, ...], Any]]:
        """Per foreign key column: our key's parts through it -> its column value, for
        the related rows that are here."""
        via: dict[int, dict[tuple[Any, ...], Any]] = {}
        for j, positions in self.link_subs:
            link = self.links[j]
            subs = {tuple(k[i] for i in positions) for k in wanted}
            manager = link.fk.related_model._base_manager.using(self.using)
            text = [plain_text(f) for f in link.sub_fields]
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
        return via

    def _local_heads(
        self, wanted: set[Key], via: dict[int, dict[tuple[Any, ...], Any]]
    ) -> dict[tuple[Any, ...], Key]:
        """Each wanted key as the values of the local key columns (the keys whose
        related rows are not all here are left out: neither are they)."""
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
        return local


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
