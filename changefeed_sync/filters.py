"""Row filters of a Target: which rows of each model it receives (issue 14).

A Target's ``row_filters`` maps model labels to Django field lookups::

    {"shop.copy": {"language__country__code__in": ["fr", "be"]},
     "shop.country": {"code__in": ["fr", "be"]}}

The Target then receives the rows of each named model that ``filter(**lookups)``
selects (the lookups of one model together, as ``filter()`` does). A model left out,
or mapped to ``{}``, is not restricted; ``{}`` restricts nothing. Labels are read
case-insensitively, as ``Target.model_labels`` is.

A filter is written on the source about data both sites hold, so it may only say
what the replication itself carries:

* the label names a registered model (the others are never sent at all);
* each hop of a path is a synced forward foreign key (or one-to-one) to a registered
  model, so that the related row is replicated too;
* the path ends at a synced column that is not a relation: never the primary key or a
  foreign key's column (``language_id``), whose values differ between sites, and never
  a many-to-many or reverse relation, which would make one row's fate depend on a
  set of other rows (and repeat it once per match);
* at most one lookup ends it (``exact`` when none), one that Django knows for that
  field. Transforms (``code__lower``, ``when__year``) are refused for now: accepting
  more later keeps every saved filter valid, refusing some later would not;
* the value is plain JSON Django accepts for that lookup: a list for ``in``, two for
  ``range``, no NaN, no integer beyond 64 bits, no text a database cannot store.

This module validates (``Target.clean()`` and the system check E011 call
:func:`filter_problems`) and reads them (:func:`queryset_filter`, for selection.py:
the source serves a filtered Target's Data Pull; its feed and pushes not yet).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db import DatabaseError, connections, models, router, transaction
from django.db.models import ForeignObjectRel, Q
from django.db.models.constants import LOOKUP_SEP
from django.db.models.fields import Field

from . import registry
from .registry import ModelOptions

#: Longest ``repr`` of a value quoted in a message.
SHOWN = 60
#: What a model's filter looks like, for messages.
EXAMPLE = '{"code__in": ["fr", "be"]}'
_INT_RANGE = (-(2**63), 2**63 - 1)  # the widest database integer
_SCALARS = (str, int, float, bool, type(None))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


# ------------------------------------------------------------------------ validation


def filter_problems(row_filters: Any) -> list[str]:
    """What is wrong with a Target's ``row_filters``, one message each (empty: fine).

    Each message names the model label and the lookup (and the value when that is
    what is wrong), so the admin form and the system check can show it as it is.
    """
    if not isinstance(row_filters, dict):
        return [
            "row_filters must be an object mapping model labels to lookups, e.g. "
            f'{{"shop.country": {EXAMPLE}}}; got {_show(row_filters)}.'
        ]
    problems: list[str] = []
    seen: dict[str, Any] = {}  # label -> the key that named it first
    for key, lookups in row_filters.items():
        options, problem = _options(key)
        if options is None:
            problems.append(problem)
            continue
        if options.label in seen:
            problems.append(
                f"{_show(key)} and {_show(seen[options.label])} both name {options.label} "
                "(labels are case-insensitive): give its lookups once."
            )
            continue
        seen[options.label] = key
        if not isinstance(lookups, dict):
            problems.append(
                f"{options.label}: the filter must be an object of lookups and their "
                f"values, e.g. {EXAMPLE}; got {_show(lookups)}."
            )
            continue
        for lookup, value in lookups.items():
            wrong = lookup_problem(options, lookup, value)
            if wrong:
                problems.append(f"{options.label}: {wrong}")
    return problems


def _options(key: Any) -> tuple[ModelOptions | None, str]:
    """The registration a label names, or why it names none."""
    if not isinstance(key, str) or key.count(".") != 1:
        return None, f"{_show(key)} is not a model label such as 'shop.country'."
    label = key.lower()
    options = registry.options_for_label(label)
    if options is not None:
        return options, ""
    if any(model._meta.label_lower == label for model in apps.get_models()):
        return None, (
            f"{label} is not registered with changefeed_sync: its rows are never sent, "
            "so there is nothing to filter."
        )
    return None, f"{_show(key)}: no installed model has this label."


def lookup_problem(options: ModelOptions, lookup: Any, value: Any) -> str | None:
    """What is wrong with one ``lookup: value`` of a model's filter, or None."""
    if not isinstance(lookup, str):
        return f"lookup {_show(lookup)} is not a string."
    walked = _walk(options, lookup.split(LOOKUP_SEP))
    if isinstance(walked, str):
        return f"lookup {lookup!r}: {walked}"
    field, name = walked
    problem = _value_problem(field, name, value) or _refused(options.model, lookup, value)
    return f"lookup {lookup!r}: {problem}" if problem else None


def _walk(options: ModelOptions, parts: list[str]) -> tuple[Field[Any, Any], str] | str:
    """The final field and the lookup name of a path, or what is wrong with it."""
    current = options
    for index, name in enumerate(parts):
        field = _synced_field(current, name, parts[:index])
        if isinstance(field, str):
            return field
        rest = parts[index + 1 :]
        if not field.is_relation:
            if len(rest) > 1:
                return (
                    f"only one lookup may follow {current.label}.{name}, not "
                    f"{LOOKUP_SEP.join(rest)!r} (transforms are not accepted)."
                )
            lookup_name = rest[0] if rest else "exact"
            if field.get_lookup(lookup_name) is None:
                kind = (
                    "a transform, not a lookup,"
                    if field.get_transform(lookup_name)
                    else "not a lookup"
                )
                return (
                    f"{lookup_name!r} is {kind} of {current.label}.{name} "
                    f"({field.get_internal_type()}): end with a lookup such as exact, "
                    "iexact, in, gt, gte, lt, lte, range, startswith, contains or isnull."
                )
            return field, lookup_name
        related_model = field.related_model
        related = registry.get_options(related_model)  # type: ignore[arg-type]
        related_label = related_model._meta.label_lower  # type: ignore[union-attr]
        # "country__in": a lookup on the key itself (unless the related model has a
        # field of that name, which Django would take first).
        if not rest or (
            len(rest) == 1
            and field.get_lookup(rest[0]) is not None
            and not _has_field(related_model, rest[0])
        ):
            return (
                f"it ends at the foreign key {current.label}.{name}: name a field of "
                f"{related_label}, e.g. {_example(parts[: index + 1], related_model)!r}."
            )
        if related is None:
            return (
                f"it goes through {related_label} ({current.label}.{name}), which is not "
                "registered with changefeed_sync."
            )
        current = related
    raise AssertionError("unreachable: the loop returns at the last part")  # pragma: no cover


def _synced_field(options: ModelOptions, name: str, prefix: list[str]) -> Field[Any, Any] | str:
    """Field ``name`` of a model, reached by the lookups ``prefix``, when a filter may
    use it (as the column filtered on or as a hop), or why it may not."""
    label = options.label
    meta = options.model._meta
    try:
        field = meta.get_field(meta.pk.name if name == "pk" and meta.pk else name)
    except FieldDoesNotExist:
        return f"{label} has no field {name!r}."
    if isinstance(field, ForeignObjectRel):
        return (
            f"{name!r} is a reverse relation of {label} (from "
            f"{field.related_model._meta.label_lower}): a filter follows foreign keys forward only."
        )
    if field.many_to_many:
        return f"{label}.{name} is a many-to-many field: a filter follows foreign keys only."
    if isinstance(field, Field) and field.primary_key:
        return (
            f"{name!r} is the primary key of {label}, whose values differ between sites: "
            f"filter on synced fields, e.g. {_example(prefix, options.model)!r}."
        )
    if isinstance(field, Field) and name != field.name:  # a foreign key's attname
        return (
            f"{name!r} is the column of the foreign key {label}.{field.name}: it holds "
            "primary keys, whose values differ between sites. Name a field of "
            f"{field.related_model._meta.label_lower} instead, "  # type: ignore[union-attr]
            f"e.g. {_example([*prefix, field.name], field.related_model)!r}."
        )
    synced = {f.name: f for f in options.concrete_fields}
    if name not in synced:
        return f"{name!r} is not a synced field of {label}."
    return synced[name]


def _has_field(model: Any, name: str) -> bool:
    try:
        model._meta.get_field(name)
    except FieldDoesNotExist:
        return False
    return True


def _example(prefix: list[str], model: Any) -> str:
    """A path from ``prefix`` to a field of ``model``: the first of its natural key."""
    options = registry.get_options(model)
    return LOOKUP_SEP.join([*prefix, options.lookups[0] if options else "<field>"])


def _scalars(value: Any) -> Iterator[Any]:
    """Every number, string, bool and null in a JSON value, dict keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        else:
            yield item


def _value_problem(field: Field[Any, Any], lookup_name: str, value: Any) -> str | None:
    """Values Django would take but a database cannot, or would read otherwise than
    meant: ``in`` with a string (its letters), a range of three, a dict compared with
    a column's text, integers beyond 64 bits, NaN (not JSON), text with NUL or lone
    surrogates (refused by PostgreSQL and by the drivers), a regex that does not compile."""
    shown = f"value {_show(value)}"
    if lookup_name in ("in", "range") and not isinstance(value, list):
        return f'{shown} must be a list, e.g. ["fr", "be"].'
    if lookup_name == "range" and len(value) != 2:
        return f"{shown} must be a list of two values, [low, high]."
    if not isinstance(field, models.JSONField):
        items = value if lookup_name in ("in", "range") else [value]
        if any(not isinstance(item, _SCALARS) for item in items):
            return f"{shown} must hold only strings, numbers, true, false or null."
    for item in _scalars(value):
        if isinstance(item, int) and not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
            return f"{shown}: {_show(item)} is beyond what a database integer holds."
        if isinstance(item, float) and not math.isfinite(item):
            return f"{shown}: {item!r} is not a JSON number."
        if isinstance(item, str) and ("\x00" in item or not _encodes(item)):
            return (
                f"{shown}: {_show(item)} holds a NUL or a lone surrogate, which databases refuse."
            )
    if lookup_name in ("regex", "iregex"):
        if not isinstance(value, str):
            return f"{shown} must be a string, a regular expression."
        try:
            re.compile(value)
        except re.error as exc:
            return f"{shown} is not a regular expression: {exc}."
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refused(model: type[models.Model], lookup: str, value: Any) -> str | None:
    """Django's own word on the value: the filter is built and compiled (not run) for
    the database the model is read from, as serving it will be."""
    try:
        queryset = model._base_manager.filter(**{lookup: value})
        compiler = queryset.query.get_compiler(using=router.db_for_read(model), elide_empty=False)
        compiler.as_sql()
    except ValidationError as exc:
        return f"value {_show(value)} is refused: {' '.join(exc.messages)}"
    # Which exception depends on the field and the backend (ValueError, TypeError,
    # FieldError, NotSupportedError, IndexError...): any of them means "not usable".
    except Exception as exc:
        return f"value {_show(value)} is refused: {exc}"
    return None


def unreceived_problems(row_filters: Any, allowed: Iterable[str] | None) -> list[str]:
    """One message per model ``row_filters`` names that a Target receiving only the
    models ``allowed`` (Target.allowed_models(); None: all) does not receive: its
    filter would never be used, which is seldom what was meant (Target.clean(), W005)."""
    if allowed is None or not isinstance(row_filters, dict):
        return []
    received = set(allowed)
    problems = []
    for key in row_filters:
        options, _ = _options(key)
        if options is not None and options.label not in received:
            problems.append(
                f"{options.label} has a filter, but this Target does not receive "
                f"{options.label} (its models: {', '.join(sorted(received)) or 'none'}): "
                "add the model to its models, or remove the filter."
            )
    return problems


# ------------------------------------------------------------------------ reading


def is_filtered(row_filters: Any) -> bool:
    """Whether these filters may hold back any row of any model.

    False only for ``{}`` and for objects whose every model maps to ``{}`` ("no
    restriction"); anything else is True, filters that :func:`filter_problems` refuses
    included, so that what decides on it fails closed: a Target whose filters cannot
    be read gets nothing rather than everything.
    """
    if not isinstance(row_filters, dict):
        return True
    return any(lookups != {} for lookups in row_filters.values())


def queryset_filter(row_filters: Any, label: str) -> Q | None:
    """The ``Q`` that selects the rows of model ``label`` these filters let through,
    or None when they do not restrict it. Call it on filters :func:`filter_problems`
    accepts; on others it raises ``ValueError`` rather than guess (fail closed)."""
    if not isinstance(row_filters, dict):
        raise ValueError(f"row_filters is not an object: {_show(row_filters)}")
    found: Q | None = None
    for key, lookups in row_filters.items():
        if not (isinstance(key, str) and key.lower() == label.lower()):
            continue
        if not isinstance(lookups, dict) or not all(isinstance(k, str) for k in lookups):
            raise ValueError(f"row_filters[{key!r}] is not an object of lookups")
        if lookups:
            found = Q(**lookups) if found is None else found & Q(**lookups)
    return found


def saved_filter_problems(
    manager: models.Manager[Any],
    databases: Iterable[str] | None,
    problems_of: Callable[[Any], list[str]] | None = None,
) -> list[tuple[Any, str]]:
    """(Target, message) for each problem of the Targets saved in ``databases``: the
    system check E011 (filters saved past ``clean()``, or a registration changed since),
    or with ``problems_of`` (a Target -> its messages) another check of them (W005).

    It takes the Target manager because models.py imports this module. Only the
    aliases given are read (Django gives the database checks those of ``migrate`` and
    ``check --database``; a bare ``check`` none), and an alias without the table or
    its ``row_filters`` column yet (before ``migrate``) is passed over.
    """
    problems_of = problems_of or (lambda target: filter_problems(target.row_filters))
    found: list[tuple[Any, str]] = []
    for alias in databases or ():
        if alias not in connections or not router.allow_migrate_model(alias, manager.model):
            continue
        try:
            with transaction.atomic(using=alias):  # a failed read leaves no broken transaction
                targets = list(manager.using(alias).only("name", "row_filters", "model_labels"))
        except DatabaseError:
            continue
        found += [
            (target, f"Target {target.name!r} (database {alias!r}): row_filters: {problem}")
            for target in targets
            for problem in problems_of(target)
        ]
    return found
