"""What one write of a registered model changed, as the event it makes.

Shared by the three ways capture sees a write (``capture``: signals;
``capture_pg``: one statement on PostgreSQL; ``capture_bulk``: querysets).
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import models

from .. import outbox, registry
from ..context import _applying
from ..models import Event
from ..registry import ModelOptions
from ..serialization import key_from_attvalues, payload_from_instance, payloads_from_db
from . import cascades, membership, routes
from .read_locks import lock_for_events

# Set while one of our queryset wrappers runs, so the queryset calls it makes
# internally (bulk_update calls update) are not captured a second time.
_inner: contextvars.ContextVar[bool] = contextvars.ContextVar("changefeed_inner", default=False)


@contextmanager
def no_capture() -> Iterator[None]:
    token = _inner.set(True)
    try:
        yield
    finally:
        _inner.reset(token)


def paused() -> bool:
    """Writes are not captured now: changes applied from a source, or the
    queryset calls one of our own wrappers makes internally."""
    return _applying.get() or _inner.get()


def capturing(model: type[models.Model]) -> ModelOptions | None:
    """The model's options when this write of it is to be captured, else None."""
    if paused():
        return None
    return registry.get_options(model)


# What changed in a save is found by comparing with the values the instance
# was loaded with. django-model-utils' FieldTracker does the same but wraps
# __init__ and every field descriptor and deep-copies on every instantiation
# (measured: creating instances 5.6x, loading rows 3.3x slower); a snapshot
# taken in from_db costs one dict per loaded row and nothing for new ones.
SNAPSHOT_ATTR = "_changefeed_loaded"


def snapshot(instance: models.Model) -> dict[str, Any]:
    values = {}
    for f in instance._meta.concrete_fields:
        if f.attname in instance.__dict__:  # deferred fields are unknown, not changed
            value = instance.__dict__[f.attname]
            values[f.attname] = copy.deepcopy(value) if isinstance(value, dict | list) else value
    return values


def has_expression(instance: models.Model) -> bool:
    """Whether a field is saved as an expression (F(), a database default), whose
    stored value only the database knows."""
    values = instance.__dict__
    return any(
        hasattr(values.get(f.attname), "resolve_expression") for f in instance._meta.concrete_fields
    )


def upsert_change(
    options: ModelOptions,
    instance: models.Model,
    created: bool,
    using: str,
    update_fields: Any = None,
    raw: bool = False,
    *,
    pk: Any = None,
    stored: bool = False,
) -> outbox.Change:
    """The change one save made: what changed since the instance was loaded,
    and the key it had before when the save renamed it. ``pk``: the row's, where
    the instance does not know it yet; ``stored``: the payload is read from the
    row, the database computed a value the instance does not hold."""
    loaded = instance.__dict__.get(SNAPSHOT_ATTR)
    if created or not loaded:
        changed = list(options.all_changed)
        old_key = None
    else:
        before = {
            f.attname: loaded[f.attname]
            for f in options.model._meta.concrete_fields
            if f.attname in loaded and loaded[f.attname] != getattr(instance, f.attname)
        }
        changed = sorted(f.name for f in options.concrete_fields if f.attname in before)
        old_key = _old_key(options, instance, before, loaded, using)
    if (
        stored
        or update_fields is not None
        or raw
        or not options.payload_in_memory
        or has_expression(instance)
    ):
        # One query reads the stored row with every related natural key (and
        # fields not saved, or saved as F() expressions, are not in memory).
        pk = instance.pk if pk is None else pk
        payload = payloads_from_db(options, [pk], using)[pk]
    else:
        payload = payload_from_instance(options, instance)
    if old_key == payload["key"]:
        old_key = None
    return outbox.Change(options.label, payload["key"], old_key, payload["data"], changed)


def _old_key(
    options: ModelOptions,
    instance: models.Model,
    before: dict[str, Any],
    loaded: dict[str, Any],
    using: str,
) -> list[Any] | None:
    """The natural key before this save, when a field it depends on changed."""
    heads = {getattr(options.model._meta.get_field(h), "attname", h) for h in options.key_heads}
    if not heads & set(before):
        return None
    values = {attname: loaded.get(attname, getattr(instance, attname)) for attname in heads}
    return list(key_from_attvalues(options, values, using))


def write_upserts(
    options: ModelOptions,
    pks: list[Any],
    using: str,
    *,
    changed: list[str] | None,
    old_keys: dict[Any, list[Any]] | None = None,
    before: dict[Any, frozenset[int]] | None = None,
    rows_unchanged: bool = False,
) -> None:
    """Upsert events of rows ``pks`` as stored now. For the filtered Targets:
    ``before``, which of them had each row (read under its lock before the write;
    None: new rows), or ``rows_unchanged``, the write changed no column (a
    many-to-many edit), so no row moved in or out."""
    if not pks:
        return
    # Locked first: a many-to-many change does not write the row itself.
    lock_for_events(options.model, pks, using)
    payloads = payloads_from_db(options, pks, using)
    routed = routes.concerned(options, using)
    if routed is not None:
        cascades.lock_parents(routed[0], options, pks, using)
    after = membership.members(options, pks, using, routed[1]) if routed else {}
    events = []
    for pk in pks:
        payload = payloads.get(pk)
        if payload is None:
            continue
        old = (old_keys or {}).get(pk)
        event = outbox.make_event(
            options.label,
            Event.UPSERT,
            payload["key"],
            old_key=old if old is not None and old != payload["key"] else None,
            data=payload["data"],
            changed=changed,
        )
        if routed is not None:
            now = after.get(pk, frozenset())
            had = now if rows_unchanged else (None if before is None else before.get(pk))
            event = event._replace(routes=routes.upsert_routes(routed[0], routed[1], had, now))
        events.append(event)
    outbox.write(using, events, locked=True)


def routed_before(
    options: ModelOptions, pks: list[Any], using: str
) -> dict[Any, frozenset[int]] | None:
    """Which filtered Targets have each of the rows ``pks`` (locked by the caller), before
    a write; None when no Target's filter reads the model."""
    routed = routes.concerned(options, using)
    if routed is None:
        return None
    cascades.lock_parents(routed[0], options, pks, using)
    return membership.members(options, pks, using, routed[1])
