"""Making room for an incoming row's unique values during a pull.

The target may hold, under another natural key, a value an incoming row is to
have (a unique field swapped between two rows, a value freed by one row and taken
by another, a natural key changed outside the ORM: the old row still holds the
other unique values when the new key arrives). When a page's write fails on an
IntegrityError, the rows here that hold one of the page's values of a unique
constraint other than the natural key (unique fields, unique_together,
UniqueConstraint without condition) under another key are moved out of the way
(the field set to NULL where it may be, else to a value no row has: ``~<n>`` for
text, the far end of an integer's range, a new UUID), remembered, and the page is
compared and written again. This is safe because the source, unique on that
constraint too, has no row with that value under their keys: each such row is
either written again by a later page (or later in the same one) with the source's
values, or deleted at the end as missing; the pull checks that before it commits
and fails naming model, natural key and field otherwise (with keep-missing, a kept
row holding a value the source needs; or a source that changed while it was read).
Why not delete missing rows first: which rows are missing is known only after
every page was read (and, compared by digests, only in the buckets that differ),
and a swap between two rows the source has needs a move anyway.
"""

from __future__ import annotations

import uuid
from functools import cached_property
from typing import Any

from django.db import DatabaseError, connections, models, transaction
from django.db.models import Q

from ... import registry
from ...exceptions import ApplyError
from ...keys import max_params, resolve_keys
from ...registry import Key, ModelOptions
from ...serialization import chunked, decode_value, key_of_row, normalize_key
from ..changes import IncomingChange


class Moves:
    """The rows of one model moved out of the way of an incoming row's unique value."""

    def __init__(self, options: ModelOptions, using: str) -> None:
        self.options = options
        self.using = using
        self.connection = connections[using]
        # Natural key -> (pk, field, natural key of the row that needed the value).
        self.moved: dict[Key, tuple[Any, str, Key | None]] = {}
        self._placeholders = 0

    def written_again(self, keys: list[Key]) -> None:
        """Rows of these keys were written with the source's values (or equal them)."""
        if self.moved:
            for key in keys:
                self.moved.pop(key, None)

    @cached_property
    def other_unique(self) -> list[tuple[tuple[Any, ...], bool]]:
        """The unique constraints that are not the natural key's, as (fields, whether
        NULL values are distinct); only those whose every field is synced (the
        incoming rows carry their values) and that have no condition."""
        meta = self.options.model._meta
        heads = set(self.options.key_heads)
        synced = self.options.field_names
        groups: list[tuple[tuple[str, ...], bool]] = [
            ((f.name,), True) for f in meta.concrete_fields if f.unique and not f.primary_key
        ]
        groups.extend((tuple(g), True) for g in meta.unique_together)
        for constraint in meta.total_unique_constraints:
            distinct = getattr(constraint, "nulls_distinct", None) is not False
            groups.append((tuple(constraint.fields), distinct))
        out = []
        for names, distinct in groups:
            if set(names) == heads or not set(names) <= synced:
                continue
            out.append((tuple(meta.get_field(name) for name in names), distinct))
        return out

    def _incoming(self, f: Any, changes: list[IncomingChange]) -> list[Any]:
        """Each change's value of field ``f`` as this site will hold it (a foreign key:
        the related row's primary key here; None where it cannot be told yet)."""
        raws = [change.data[f.name] for change in changes]
        if not f.is_relation:
            return [None if raw is None else decode_value(f, raw) for raw in raws]
        rel = registry.get_options(f.related_model)
        if rel is None:
            return [None] * len(changes)
        keys = [None if raw is None else normalize_key(rel, raw) for raw in raws]
        mapped = resolve_keys(rel, {k for k in keys if k is not None}, self.using)
        return [None if k is None else mapped.get(k) for k in keys]

    def make_room(self, changes: list[IncomingChange]) -> int:
        """Move out of the way the rows here that hold, under another natural key, a
        unique value (not the natural key) that one of ``changes`` is to have; return
        how many were moved. The source has no row with that value under their keys,
        so each of them is either written again by a later page of this pull or
        deleted as missing; the pull checks that at its end (``check_moved``)."""
        options = self.options
        manager = options.model._base_manager.using(self.using)
        moved = 0
        for group, nulls_distinct in self.other_unique:
            columns = [self._incoming(f, changes) for f in group]
            wanted: dict[tuple[Any, ...], Key] = {}
            own: dict[Key, tuple[Any, ...]] = {}
            for change, values in zip(changes, zip(*columns), strict=True):
                own[change.key] = values
                if nulls_distinct and any(v is None for v in values):
                    continue  # NULL clashes with nothing
                wanted[values] = change.key
            if not wanted:
                continue
            lookups = [f.attname if not f.is_relation else f"{f.name}__pk" for f in group]
            holders = []
            for chunk in chunked(list(wanted), max(1, max_params(self.using) // len(group))):
                condition = Q()
                for values in chunk:
                    condition |= Q(**dict(zip(lookups, values, strict=True)))
                holders.extend(
                    manager.filter(condition).values_list("pk", *lookups, *options.lookups)
                )
            for row in holders:
                pk, values = row[0], tuple(row[1 : 1 + len(group)])
                key = key_of_row(options, row[1 + len(group) :])
                if own.get(key) == values:
                    continue  # the row that is to have this value
                needed_by = wanted.get(values)
                self._move(pk, key, group, nulls_distinct, set(wanted), needed_by)
                moved += 1
        return moved

    def _move(
        self,
        pk: Any,
        key: Key,
        group: tuple[Any, ...],
        nulls_distinct: bool,
        taken: set[tuple[Any, ...]],
        needed_by: Key | None,
    ) -> None:
        """Give the row ``pk`` a value of one field of ``group`` that clashes with
        nothing: NULL where the field allows it, else a value not used here."""
        label = self.options.label
        field = next((f for f in group if f.null and nulls_distinct), None)
        value: Any = None
        if field is None:
            for f in group:
                index = group.index(f)
                value = self._free_value(f, {values[index] for values in taken})
                if value is not None:
                    field = f
                    break
        if field is None:
            whose = f" (the source's row {list(needed_by)!r} has it)" if needed_by else ""
            raise ApplyError(
                f"a row here holds a unique value the source's row needs{whose}, and no "
                "value can be put in its place to make room (the field is neither nullable "
                "nor text, integer or UUID)",
                model=label, key=key, field=group[0].name,
            )  # fmt: skip
        connection = self.connection
        qn = connection.ops.quote_name
        meta = self.options.model._meta
        assert meta.pk is not None
        try:
            with transaction.atomic(using=self.using), connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {qn(meta.db_table)} SET {qn(field.column)} = %s "
                    f"WHERE {qn(meta.pk.column)} = %s",
                    [field.get_db_prep_save(value, connection), pk],
                )
        except DatabaseError as exc:
            raise ApplyError(
                f"a row here holds a unique value the source's row needs, and moving it "
                f"out of the way failed ({exc})",
                model=label, key=key, field=field.name,
            ) from exc  # fmt: skip
        first = self.moved.get(key)
        self.moved[key] = (pk, first[1] if first else field.name, needed_by)

    def _free_value(self, f: Any, taken: set[Any]) -> Any:
        """A value of ``f`` that no row here has and no incoming row wants, or None
        when no such value can be made for its type."""
        manager = self.options.model._base_manager.using(self.using)
        for attempt in range(64):
            n = self._placeholders
            self._placeholders += 64
            candidates: list[Any]
            if isinstance(f, models.UUIDField):
                candidates = [uuid.uuid4() for _ in range(8)]
            elif isinstance(f, models.CharField | models.TextField):
                room = f.max_length or 32
                if room < 2:  # a few symbols, checked once
                    candidates = list("~!#$%&*+-=?@^_|") if not attempt else []
                else:
                    candidates = [text for i in range(n, n + 64) if len(text := f"~{i:x}") <= room]
            elif isinstance(f, models.IntegerField) and not f.is_relation:
                try:
                    low, high = self.connection.ops.integer_field_range(f.get_internal_type())
                except KeyError:
                    return None
                if low is not None and low < 0:
                    candidates = list(range(low + n, low + n + 64))
                elif high is not None:
                    candidates = list(range(high - n, high - n - 64, -1))
                else:
                    return None
            else:
                return None
            free = [c for c in candidates if c not in taken]
            if not free:
                if not candidates:
                    return None  # none of this length is left
                continue
            used = set(
                manager.filter(**{f"{f.attname}__in": free}).values_list(f.attname, flat=True)
            )
            value = next((c for c in free if c not in used), None)
            if value is not None:
                return value
        return None

    def check_moved(self, keep_missing: bool) -> None:
        """Every row moved out of the way must have been written again or deleted."""
        if not self.moved:
            return
        by_pk = {pk: (key, field, needed_by) for key, (pk, field, needed_by) in self.moved.items()}
        left = self.options.model._base_manager.using(self.using).filter(pk__in=list(by_pk))
        for pk in left.order_by("pk").values_list("pk", flat=True):
            key, field, needed_by = by_pk[pk]
            whose = f"the source's row {list(needed_by)!r}" if needed_by else "another row"
            if keep_missing:
                why = (
                    f"the source does not have this row and keep-missing keeps it, but its "
                    f"value is {whose}'s: the target cannot equal the source; pull without "
                    "keep-missing, or delete the row here"
                )
            else:
                why = (
                    f"this row held the value {whose} has and the source's copy of it "
                    "did not arrive after that (did the source change during the pull?)"
                )
            raise ApplyError(why, model=self.options.label, key=key, field=field)
