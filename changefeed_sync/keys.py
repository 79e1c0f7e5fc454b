"""Natural keys on one database: which rows they name, and in what order models go.

Apply, the full pull, the snapshot and capture all resolve natural keys to
primary keys here, so a key is looked up the same way wherever it comes from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from graphlib import CycleError, TopologicalSorter
from typing import Any

from django.db import connections, models
from django.db.models import Q

from .registry import Key, ModelOptions
from .serialization import chunked, decode_value, key_of_row


def max_params(using: str) -> int:
    """Bind parameters one statement may carry on ``using`` (at most 2,000)."""
    limit = connections[using].features.max_query_params
    return min(limit or 2000, 2000)


def resolve_keys(options: ModelOptions, keys: Iterable[Key], using: str) -> dict[Key, Any]:
    """Natural key -> primary key on ``using`` for the keys that exist there.

    Keys are grouped by all parts but the last, and each group is one exact
    condition ``a = x AND b = y AND c IN (...)``, so a query fetches only the
    wanted rows through the natural key's unique index; chunks keep every
    statement under the database's bind-parameter limit.

    When the keys nearly fill the cross product of their parts' values (the
    rows a page points at: a few countries x a few languages), a single
    condition ``a IN (...) AND b IN (...)`` fetches the same rows with one
    small statement instead of one condition per group.
    """
    wanted = {tuple(k) for k in keys}
    found: dict[Key, Any] = {}
    if not wanted:
        return found
    budget = max_params(using)
    manager = options.model._base_manager.using(using)

    def run(conditions: list[Q]) -> None:
        query = conditions[0]
        for condition in conditions[1:]:
            query |= condition
        for row in manager.filter(query).values_list("pk", *options.lookups):
            key = key_of_row(options, row[1:])
            if key in wanted:
                found[key] = row[0]

    distinct = [set(values) for values in zip(*wanted)]
    product = 1
    for values in distinct:
        product *= len(values)
    if (
        len(distinct) > 1
        and product <= 2 * len(wanted)
        and sum(map(len, distinct)) <= budget
        and not any(None in values for values in distinct)  # IN never matches NULL
    ):
        run(
            [
                Q(
                    **{
                        f"{lookup}__in": [decode_value(f, v) for v in values]
                        for lookup, f, values in zip(
                            options.lookups, options.key_fields, distinct, strict=True
                        )
                    }
                )
            ]
        )
        return found
    *head_lookups, last_lookup = options.lookups
    *head_fields, last_field = options.key_fields
    groups: dict[Key, list[Any]] = defaultdict(list)
    for key in wanted:
        groups[key[:-1]].append(key[-1])

    batch: list[Q] = []
    used = 0
    for prefix, lasts in groups.items():
        exact = {
            lookup: decode_value(f, v)
            for lookup, f, v in zip(head_lookups, head_fields, prefix, strict=True)
        }
        step = max(1, budget - len(exact) - 1)
        for chunk in chunked(lasts, step):
            cost = len(exact) + len(chunk)
            if batch and used + cost > budget:
                run(batch)
                batch, used = [], 0
            batch.append(
                Q(**exact, **{f"{last_lookup}__in": [decode_value(last_field, v) for v in chunk]})
            )
            used += cost
    if batch:
        run(batch)
    return found


def model_order(models_: Iterable[type[models.Model]]) -> list[type[models.Model]]:
    """Parents before children: a model comes after the models its foreign keys
    and many-to-many fields point at, in rounds (every model whose parents are
    placed), each round in label order. Self-references are ignored (rounds in
    ``_apply_upserts`` order those rows); a cycle is broken by taking the first
    model left in label order, whatever it points at.

    Django's ``sort_dependencies`` only follows models that define
    ``natural_key()``, which registered models need not do.
    """
    wanted = sorted(set(models_), key=_label)
    deps: dict[type[models.Model], set[type[models.Model]]] = {}
    for model in wanted:
        related = {
            f.related_model
            for f in model._meta.get_fields()
            if (f.many_to_one or f.one_to_one or f.many_to_many) and f.concrete
        }
        deps[model] = {m for m in related if m in deps or m in wanted} - {model}
    sorter = TopologicalSorter(deps)
    try:
        sorter.prepare()
    except CycleError:
        return _order_breaking_cycles(wanted, deps)
    ordered: list[type[models.Model]] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=_label)
        ordered.extend(ready)
        sorter.done(*ready)
    return ordered


def _label(model: type[models.Model]) -> str:
    return model._meta.label_lower


def _order_breaking_cycles(
    wanted: list[type[models.Model]], deps: dict[type[models.Model], set[type[models.Model]]]
) -> list[type[models.Model]]:
    """``model_order``'s rounds when models point at each other in a circle (which
    graphlib refuses to order): stuck, the first model left goes next, and rounds in
    ``_apply_upserts`` sort its rows out."""
    ordered: list[type[models.Model]] = []
    remaining = list(wanted)
    while remaining:
        placed = set(ordered)
        ready = [m for m in remaining if deps[m] <= placed] or [remaining[0]]
        for m in ready:
            ordered.append(m)
            remaining.remove(m)
    return ordered
