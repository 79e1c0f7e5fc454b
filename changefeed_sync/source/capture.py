"""Changes of registered models -> outbox events, in the writer's transaction.

Three ways a row changes, three hooks:

- ``save()`` / ``delete()`` and many-to-many edits send signals; the
  receivers below turn them into events. ``save_base`` of a registered model
  is wrapped in ``atomic`` because Django sends ``post_save`` after its own
  write has committed in autocommit mode, and an event written then could be
  lost to a crash in between.
- ``QuerySet.bulk_create``, ``bulk_update`` and ``update`` send no signals;
  they are wrapped once, for every queryset, and capture only when the model
  is registered. ``QuerySet.delete`` does send signals for models with
  receivers, so it needs nothing extra.
- Rows written by ``apply`` (changes coming from a source) are not captured
  again: ``applying()`` marks them, like Django's ``raw=True``.

On PostgreSQL a save whose event needs nothing but the instance (no
relations) sends its row and its event as one statement (``capture_pg``).
What a write changed, as an event, is worked out in ``events``; querysets
are wrapped in ``capture_bulk``.

Writers take no lock among themselves: the feed's order is given after commit
(``sequencer.sequence``). What a writer reads to build its event, it reads under
a row lock, so that the order of events never contradicts what they say (see
``read_locks``).
"""

from __future__ import annotations

import functools
from typing import Any

from django.db import connections, models, router, transaction
from django.db.models import signals

from .. import outbox, registry
from ..models import Event
from ..registry import ModelOptions
from ..serialization import key_from_attvalues, key_of_instance
from . import cascades, membership, routes
from .capture_pg import PLAN_ATTR, one_statement_plan, wrap_row_writes
from .events import (
    SNAPSHOT_ATTR,
    capturing,
    paused,
    snapshot,
    upsert_change,
    write_upserts,
)
from .read_locks import lock_for_events

# Which filtered Targets had the row before this write (routes.py), from pre_save or
# pre_delete to the event.
ROUTED_BEFORE = "_changefeed_routed_before"
# The children a parent's save moves in or out of filters (cascades.py), pre_save to post_save.
CASCADE_ATTR = "_changefeed_cascade"
# ROUTED_BEFORE when the save changes no field the filters read: where it is after.
SAME: frozenset[int] = frozenset({-1})

# ------------------------------------------------------------ registration


def connect(options: ModelOptions) -> None:
    """Hook a newly registered model: loaded-values snapshot, atomic save, receivers."""
    model = options.model
    if not getattr(model, "_changefeed_hooked", False):
        _wrap_from_db(model)
        _wrap_save_base(model)
        wrap_row_writes(model)
        model._changefeed_hooked = True  # type: ignore[attr-defined]
    uid = f"changefeed_sync:{model._meta.label}"
    signals.pre_save.connect(_pre_write, sender=model, dispatch_uid=uid)
    signals.post_save.connect(_post_save, sender=model, dispatch_uid=uid)
    signals.pre_delete.connect(_pre_delete, sender=model, dispatch_uid=uid)
    signals.post_delete.connect(_post_delete, sender=model, dispatch_uid=uid)
    for m2m in options.m2m_fields:
        signals.m2m_changed.connect(
            _m2m_changed, sender=m2m.remote_field.through, dispatch_uid=f"{uid}:{m2m.name}"
        )


def disconnect(options: ModelOptions) -> None:
    model = options.model
    uid = f"changefeed_sync:{model._meta.label}"
    for signal in (signals.pre_save, signals.post_save, signals.pre_delete, signals.post_delete):
        signal.disconnect(sender=model, dispatch_uid=uid)
    for m2m in options.m2m_fields:
        signals.m2m_changed.disconnect(
            sender=m2m.remote_field.through, dispatch_uid=f"{uid}:{m2m.name}"
        )


def _wrap_from_db(model: type[models.Model]) -> None:
    original = model.from_db.__func__  # type: ignore[attr-defined]

    def from_db(
        cls: type[models.Model], /, db: str | None, field_names: Any, values: Any, **kwargs: Any
    ) -> Any:
        # **kwargs: Django 6.1 passes fetch_mode to a from_db that accepts it.
        instance = original(cls, db, field_names, values, **kwargs)
        instance.__dict__[SNAPSHOT_ATTR] = snapshot(instance)
        return instance

    model.from_db = classmethod(from_db)  # type: ignore[assignment,method-assign]


def _wrap_save_base(model: type[models.Model]) -> None:
    original = model.save_base

    @functools.wraps(original)
    def save_base(self: models.Model, *args: Any, **kwargs: Any) -> Any:
        if paused() or (
            not registry.is_registered(type(self)) and not registry.is_registered(model)
        ):
            # Nothing to capture (a change applied from a source): no transaction of ours.
            return original(self, *args, **kwargs)
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        plan = one_statement_plan(self, using, args, kwargs)
        # Per save: a receiver may save the same instance again, inside this one.
        outer = self.__dict__.get(PLAN_ATTR)
        self.__dict__[PLAN_ATTR] = plan
        try:
            if plan is not None:
                return original(self, *args, **kwargs)
            if connections[using].in_atomic_block:
                # Already in a transaction: an error in a receiver (the event's)
                # must still doom it, as atomic() would, so that no caller
                # catching it commits the row without its event.
                with transaction.mark_for_rollback_on_error(using=using):
                    return original(self, *args, **kwargs)
            with transaction.atomic(using=using):
                return original(self, *args, **kwargs)
        finally:
            if outer is None:
                self.__dict__.pop(PLAN_ATTR, None)
            else:
                self.__dict__[PLAN_ATTR] = outer

    model.save_base = save_base  # type: ignore[method-assign]


# ------------------------------------------------------------ signals


def _pre_write(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    options = capturing(sender)
    if options is None or instance.__dict__.get(PLAN_ATTR) is not None:
        return  # a one-statement save sends its event with its row
    using = kwargs.get("using") or instance._state.db or "default"
    outbox.lock(using)  # SQLite: the write lock before this transaction reads
    if instance.pk is not None:
        _route_before(options, instance, using)
    if not instance._state.adding and SNAPSHOT_ATTR not in instance.__dict__:
        # Built by hand with a primary key, never loaded: read what is stored,
        # locked, so that no other writer changes its key in between.
        stored = (
            sender._base_manager.using(using)
            .select_for_update()
            .filter(pk=instance.pk)
            .values(*(f.attname for f in sender._meta.concrete_fields))
            .first()
        )
        instance.__dict__[SNAPSHOT_ATTR] = stored or {}


def _route_before(options: ModelOptions, instance: models.Model, using: str) -> None:
    """For the filtered Targets, before a save: where the row was (ROUTED_BEFORE), and
    the children a parent's change moves (CASCADE_ATTR). Changes are told against the
    stored row, read once and locked: an instance loaded before another writer's change
    writes its old values back, which moves rows as much as a new value does."""
    found = routes.routing(using)
    if found is None:
        return
    label = options.label
    concerned = found.concerned(label)
    own = found.fields_read(label) if concerned else set()
    parents = {d.field for d in found.moved_by(label, None)}
    wanted = (own - {"*"}) | parents
    fields = [f for f in options.model._meta.concrete_fields if f.name in wanted]
    stored = (
        options.model._base_manager.using(using).select_for_update().filter(pk=instance.pk)
        .values(*(f.attname for f in fields)).first()
    ) if fields else None  # fmt: skip
    changed = set() if stored is None else {
        f.name for f in fields if stored[f.attname] != getattr(instance, f.attname)
    }  # fmt: skip
    if concerned:
        if stored is not None and "*" not in own and not changed & own:
            # The fields its filters read are stored with the values it saves: it
            # stays where it is for every Target (read where it is after the write).
            instance.__dict__[ROUTED_BEFORE] = SAME
        else:
            # Which Targets had the row, read under its lock (and its filters'
            # parents', for share) so no other writer moves it in or out meanwhile.
            lock_for_events(options.model, [instance.pk], using)
            cascades.lock_parents(found, options, [instance.pk], using)
            had = membership.members(options, [instance.pk], using, concerned)
            instance.__dict__[ROUTED_BEFORE] = had.get(instance.pk, frozenset())
    moved = sorted(changed & parents)
    cascade = cascades.before_write(options, [instance.pk], moved, using) if moved else None
    if cascade is not None:
        instance.__dict__[CASCADE_ATTR] = cascade


def _post_save(
    sender: type[models.Model],
    instance: models.Model,
    created: bool,
    raw: bool = False,
    using: str = "default",
    update_fields: Any = None,
    **kwargs: Any,
) -> None:
    options = capturing(sender)
    if options is None:
        return
    plan = instance.__dict__.get(PLAN_ATTR)
    if plan is None or not plan.rewritten:
        if not options.payload_in_memory:
            # The row is written (locked); the rows its event names are not.
            lock_for_events(sender, [instance.pk], using, rows=False)
        change = upsert_change(options, instance, created, using, update_fields, raw)
        # Outside a plan the lock was taken in pre_save; a plan whose row
        # statement was never seen (not expected) takes it here.
        route = _upsert_routes(options, instance, using)
        cascade = instance.__dict__.pop(CASCADE_ATTR, None)
        leavers, joiners = cascades.events(cascade, using) if cascade else ([], [])
        outbox.write(using, [*leavers, change.event(route), *joiners], locked=plan is None)
    # Later saves of this instance compare with what is stored now.
    instance.__dict__[SNAPSHOT_ATTR] = snapshot(instance)


def _upsert_routes(options: ModelOptions, instance: models.Model, using: str) -> str | None:
    """The saved row's routes to the filtered Targets (None: no filter reads the model)."""
    routed = routes.concerned(options, using)
    before = instance.__dict__.pop(ROUTED_BEFORE, None)
    if routed is None:
        return None
    if before is not SAME:
        cascades.lock_parents(routed[0], options, [instance.pk], using)  # its parents now
    after = membership.members(options, [instance.pk], using, routed[1]).get(
        instance.pk, frozenset()
    )
    if before is SAME:
        before = after
    return routes.upsert_routes(routed[0], routed[1], before, after)


def _pre_delete(
    sender: type[models.Model], instance: models.Model, using: str = "default", **kwargs: Any
) -> None:
    options = capturing(sender)
    if options is None:
        return
    outbox.lock(using)
    lock_for_events(sender, [instance.pk], using)
    routed = routes.concerned(options, using)
    if routed is not None:
        found = membership.members(options, [instance.pk], using, routed[1])
        instance.__dict__[ROUTED_BEFORE] = found.get(instance.pk, frozenset())
    # Read the key now: in a cascade, rows it goes through may be gone by post_delete.
    heads = {getattr(sender._meta.get_field(h), "attname", h) for h in options.key_heads}
    values = {attname: getattr(instance, attname) for attname in heads}
    instance._changefeed_deleted_key = list(key_from_attvalues(options, values, using))  # type: ignore[attr-defined]


def _post_delete(
    sender: type[models.Model], instance: models.Model, using: str = "default", **kwargs: Any
) -> None:
    options = capturing(sender)
    if options is None:
        return
    key = getattr(instance, "_changefeed_deleted_key", None)
    if key is None:
        key = list(key_of_instance(options, instance))
    event = outbox.make_event(options.label, Event.DELETE, key)
    routed = routes.concerned(options, using)
    if routed is not None:
        before = instance.__dict__.pop(ROUTED_BEFORE, frozenset())
        event = event._replace(routes=routes.delete_routes(routed[0], routed[1], before))
    outbox.write(using, [event], locked=True)


def _m2m_changed(
    sender: Any,
    instance: models.Model,
    action: str,
    reverse: bool,
    model: type[models.Model],
    pk_set: set[Any] | None,
    using: str,
    **kwargs: Any,
) -> None:
    if paused():
        return
    # Which registered model owns the field, and which of its rows changed.
    if not reverse:
        owner: type[models.Model] = type(instance)
    else:
        owner = model
    options = registry.get_options(owner)
    if options is None or not any(m.remote_field.through is sender for m in options.m2m_fields):
        return
    if action.startswith("pre_"):
        outbox.lock(using)
        if action == "pre_clear" and reverse:
            # post_clear gets no pk_set: remember whose links are about to go.
            field = next(m for m in options.m2m_fields if m.remote_field.through is sender)
            through: Any = field.remote_field.through
            instance._changefeed_cleared = list(  # type: ignore[attr-defined]
                through._base_manager.using(using)
                .filter(**{field.m2m_reverse_field_name(): instance.pk})
                .values_list(f"{field.m2m_field_name()}_id", flat=True)
            )
        return
    if not reverse:
        pks = [instance.pk]
    elif action == "post_clear":
        pks = getattr(instance, "_changefeed_cleared", [])
    else:
        pks = list(pk_set or ())
    write_upserts(options, pks, using, changed=None, rows_unchanged=True)
