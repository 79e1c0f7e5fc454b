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
relations) sends its row and its event as one statement (``outbox_pg``): in
autocommit one round trip instead of four, still one transaction; inside
``atomic()`` one instead of two.

Writers take no lock among themselves: the feed's order is given after commit
(``outbox.sequence``). What a writer reads to build its event, it reads under
a row lock, so that the order of events never contradicts what they say (see
``_lock_rows``).
"""

from __future__ import annotations

import contextvars
import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connections, models, router, transaction
from django.db.models import QuerySet, signals

from . import outbox, outbox_pg, registry
from .context import _applying
from .keys import resolve_keys
from .models import Event
from .read_locks import lock_for_events
from .registry import ModelOptions
from .serialization import (
    key_from_attvalues,
    key_of_instance,
    payload_from_instance,
    payloads_from_db,
)

# Set while one of our queryset wrappers runs, so the queryset calls it makes
# internally (bulk_update calls update) are not captured a second time.
_inner: contextvars.ContextVar[bool] = contextvars.ContextVar("changefeed_inner", default=False)


@contextmanager
def _no_capture() -> Iterator[None]:
    token = _inner.set(True)
    try:
        yield
    finally:
        _inner.reset(token)


def _capturing(model: type[models.Model]) -> ModelOptions | None:
    if _applying.get() or _inner.get():
        return None
    return registry.get_options(model)


# ------------------------------------------------------------ registration


def connect(options: ModelOptions) -> None:
    """Hook a newly registered model: loaded-values snapshot, atomic save, receivers."""
    model = options.model
    if not getattr(model, "_changefeed_hooked", False):
        _wrap_from_db(model)
        _wrap_save_base(model)
        _wrap_row_writes(model)
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


# What changed in a save is found by comparing with the values the instance
# was loaded with. django-model-utils' FieldTracker does the same but wraps
# __init__ and every field descriptor and deep-copies on every instantiation
# (measured: creating instances 5.6x, loading rows 3.3x slower); a snapshot
# taken in from_db costs one dict per loaded row and nothing for new ones.
SNAPSHOT_ATTR = "_changefeed_loaded"


def _snapshot(instance: models.Model) -> dict[str, Any]:
    values = {}
    for f in instance._meta.concrete_fields:
        if f.attname in instance.__dict__:  # deferred fields are unknown, not changed
            value = instance.__dict__[f.attname]
            values[f.attname] = copy.deepcopy(value) if isinstance(value, dict | list) else value
    return values


def _wrap_from_db(model: type[models.Model]) -> None:
    original = model.from_db.__func__  # type: ignore[attr-defined]

    def from_db(
        cls: type[models.Model], db: str | None, field_names: Any, values: Any, **kwargs: Any
    ) -> Any:
        # **kwargs: Django 6.1 passes fetch_mode to a from_db that accepts it.
        instance = original(cls, db, field_names, values, **kwargs)
        instance.__dict__[SNAPSHOT_ATTR] = _snapshot(instance)
        return instance

    model.from_db = classmethod(from_db)  # type: ignore[assignment,method-assign]


def _wrap_save_base(model: type[models.Model]) -> None:
    original = model.save_base

    @functools.wraps(original)
    def save_base(self: models.Model, *args: Any, **kwargs: Any) -> Any:
        if not registry.is_registered(type(self)) and not registry.is_registered(model):
            return original(self, *args, **kwargs)
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        plan = _one_statement_plan(self, using, args, kwargs)
        # Per save: a receiver may save the same instance again, inside this one.
        outer = self.__dict__.get(PLAN_ATTR)
        self.__dict__[PLAN_ATTR] = plan
        try:
            if plan is not None:
                return original(self, *args, **kwargs)
            # savepoint=False: free inside an existing transaction, a real one in autocommit.
            with transaction.atomic(using=using, savepoint=False):
                return original(self, *args, **kwargs)
        finally:
            if outer is None:
                self.__dict__.pop(PLAN_ATTR, None)
            else:
                self.__dict__[PLAN_ATTR] = outer

    model.save_base = save_base  # type: ignore[method-assign]


# ------------------------------------------------------------ one statement


PLAN_ATTR = "_changefeed_one_statement"


class _Plan:
    """A save whose row statements carry their own event (PostgreSQL)."""

    __slots__ = ("options", "using", "rewritten")

    def __init__(self, options: ModelOptions, using: str) -> None:
        self.options = options
        self.using = using
        self.rewritten = 0  # row statements sent with their event


def _one_statement_plan(
    instance: models.Model, using: str, args: Any, kwargs: dict[str, Any]
) -> _Plan | None:
    """A plan when this save can be one statement, else None (the atomic path).

    Only where the event follows from the instance and the row statement
    alone: no relations to look up, not raw, every field saved, no parent
    tables (several statements), no expression values (F(), a database
    default: the stored value is not in memory), and a known "before" for an
    update (an instance that was never loaded is read first, in a transaction).
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    options = _capturing(type(instance))
    if options is None or args or kwargs.get("raw") or kwargs.get("update_fields") is not None:
        return None
    concrete: Any = instance._meta.concrete_model  # a proxy's parents are not tables
    if not options.payload_in_memory or concrete._meta.parents:
        return None
    if not connection.in_atomic_block and not connection.get_autocommit():
        return None  # a transaction managed by hand (set_autocommit(False))
    if not instance._state.adding and SNAPSHOT_ATTR not in instance.__dict__:
        return None
    if _has_expression(instance):
        return None
    return _Plan(options, using)


def _has_expression(instance: models.Model) -> bool:
    """Whether a field is saved as an expression (F(), a database default), whose
    stored value only the database knows."""
    values = instance.__dict__
    return any(
        hasattr(values.get(f.attname), "resolve_expression") for f in instance._meta.concrete_fields
    )


class _Rewriter:
    """Execute wrapper for one ``_do_insert`` / ``_do_update``: sends its row
    statement with the event (``outbox_pg``)."""

    def __init__(self, instance: models.Model, plan: _Plan) -> None:
        self.instance = instance
        self.plan = plan
        self.done = False
        # The row's own statement, not one a field's pre_save may send while
        # Django compiles it (a storage writing to the same database, say).
        qn = connections[plan.using].ops.quote_name
        table = qn(instance._meta.db_table)
        self.heads = (f"INSERT INTO {table} ", f"UPDATE {table} SET ")

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if self.done or many or not sql.startswith(self.heads):
            return execute(sql, params, many, context)
        self.done = True
        plan = self.plan
        plan.rewritten += 1
        created = sql.startswith("INSERT")
        change = None
        if not _has_expression(self.instance):
            # The row's values are final here: the fields' pre_save (auto_now and
            # the like) ran while Django compiled this statement (Django 6.0+
            # runs it once before, too, and the compiled one is what is stored).
            change = _upsert_change(plan.options, self.instance, created, plan.using)
            model = type(self.instance)
            result = outbox_pg.execute_with_event(execute, sql, params, context, model, change)
            if result is not outbox_pg.DECLINED:
                outbox.after_this_transaction(plan.using)
                return result
            if not outbox_pg.values_are_parameters(sql):
                # A field's pre_save returned an expression: the instance does not
                # hold the stored value (Django 6.0+ reads it back only afterwards).
                change = None
        # A value only the database knows (an expression set by a pre_save
        # receiver or returned by a field's pre_save), or a statement shape
        # outbox_pg does not know: in one transaction, the row, then the event
        # (for a value the database computed, from what was stored).
        with transaction.atomic(using=plan.using, savepoint=False):
            outbox.lock(plan.using)
            result = execute(sql, params, many, context)
            if context["cursor"].rowcount:
                if change is None:
                    pk = self.instance.pk
                    if pk is None or hasattr(pk, "resolve_expression"):
                        # An INSERT whose RETURNING Django has not read yet.
                        with connections[plan.using].cursor() as cursor:
                            cursor.execute("SELECT lastval()")
                            pk = cursor.fetchone()[0]
                    change = _upsert_change(
                        plan.options, self.instance, created, plan.using, pk=pk, stored=True
                    )
                outbox.write(plan.using, [change.event()], locked=True)
        return result


def _wrap_row_writes(model: type[models.Model]) -> None:
    """Wrap the two methods that send a save's row statement (for ``_Rewriter``)."""
    for name in ("_do_insert", "_do_update"):
        original = getattr(model, name)

        def method(
            self: models.Model, *args: Any, __original: Any = original, **kwargs: Any
        ) -> Any:
            plan = self.__dict__.get(PLAN_ATTR)
            if plan is None:
                return __original(self, *args, **kwargs)
            with connections[plan.using].execute_wrapper(_Rewriter(self, plan)):
                return __original(self, *args, **kwargs)

        functools.update_wrapper(method, original)
        setattr(model, name, method)


# ------------------------------------------------------------ signals


def _pre_write(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    if _capturing(sender) is None or instance.__dict__.get(PLAN_ATTR) is not None:
        return  # a one-statement save sends its event with its row
    using = kwargs.get("using") or instance._state.db or "default"
    outbox.lock(using)  # SQLite: the write lock before this transaction reads
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


def _post_save(
    sender: type[models.Model],
    instance: models.Model,
    created: bool,
    raw: bool = False,
    using: str = "default",
    update_fields: Any = None,
    **kwargs: Any,
) -> None:
    options = _capturing(sender)
    if options is None:
        return
    plan = instance.__dict__.get(PLAN_ATTR)
    if plan is None or not plan.rewritten:
        if not options.payload_in_memory:
            # The row is written (locked); the rows its event names are not.
            lock_for_events(sender, [instance.pk], using, rows=False)
        change = _upsert_change(options, instance, created, using, update_fields, raw)
        # Outside a plan the lock was taken in pre_save; a plan whose row
        # statement was never seen (not expected) takes it here.
        outbox.write(using, [change.event()], locked=plan is None)
    # Later saves of this instance compare with what is stored now.
    instance.__dict__[SNAPSHOT_ATTR] = _snapshot(instance)


def _upsert_change(
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
        or _has_expression(instance)
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


def _pre_delete(
    sender: type[models.Model], instance: models.Model, using: str = "default", **kwargs: Any
) -> None:
    options = _capturing(sender)
    if options is None:
        return
    outbox.lock(using)
    lock_for_events(sender, [instance.pk], using)
    # Read the key now: in a cascade, rows it goes through may be gone by post_delete.
    heads = {getattr(sender._meta.get_field(h), "attname", h) for h in options.key_heads}
    values = {attname: getattr(instance, attname) for attname in heads}
    instance._changefeed_deleted_key = list(key_from_attvalues(options, values, using))  # type: ignore[attr-defined]


def _post_delete(
    sender: type[models.Model], instance: models.Model, using: str = "default", **kwargs: Any
) -> None:
    options = _capturing(sender)
    if options is None:
        return
    key = getattr(instance, "_changefeed_deleted_key", None)
    if key is None:
        key = list(key_of_instance(options, instance))
    outbox.write(using, [outbox.make_event(options.label, Event.DELETE, key)], locked=True)


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
    if _applying.get() or _inner.get():
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
    _write_upserts(options, pks, using, changed=None)


def _write_upserts(
    options: ModelOptions,
    pks: list[Any],
    using: str,
    *,
    changed: list[str] | None,
    old_keys: dict[Any, list[Any]] | None = None,
) -> None:
    if not pks:
        return
    # Locked first: a many-to-many change does not write the row itself.
    lock_for_events(options.model, pks, using)
    payloads = payloads_from_db(options, pks, using)
    events = []
    for pk in pks:
        payload = payloads.get(pk)
        if payload is None:
            continue
        old = (old_keys or {}).get(pk)
        events.append(
            outbox.make_event(
                options.label,
                Event.UPSERT,
                payload["key"],
                old_key=old if old is not None and old != payload["key"] else None,
                data=payload["data"],
                changed=changed,
            )
        )
    outbox.write(using, events, locked=True)


# ------------------------------------------------------------ querysets


def _write_db(qs: QuerySet[Any]) -> str:
    # The alias given with using(), else what the router says for writes.
    return getattr(qs, "_db", None) or router.db_for_write(qs.model)


def _keys_by_pk(options: ModelOptions, qs: QuerySet[Any]) -> dict[Any, list[Any]]:
    from .serialization import key_of_row

    return {
        row[0]: list(key_of_row(options, row[1:])) for row in qs.values_list("pk", *options.lookups)
    }


def _bulk_create(original: Any) -> Any:
    @functools.wraps(original)
    def bulk_create(self: QuerySet[Any], objs: Any, *args: Any, **kwargs: Any) -> Any:
        options = _capturing(self.model)
        if options is None:
            return original(self, objs, *args, **kwargs)
        objs = list(objs)
        using = _write_db(self)
        with transaction.atomic(using=using, savepoint=False):
            outbox.lock(using)
            with _no_capture():
                result = original(self, objs, *args, **kwargs)
            pks = [obj.pk for obj in result]
            if any(pk is None for pk in pks):
                # ignore_conflicts / update_conflicts on some databases: no ids
                # come back, so find the rows by natural key.
                keys = [key_of_instance(options, obj) for obj in objs]
                pks = list(resolve_keys(options, keys, using).values())
            _write_upserts(options, pks, using, changed=None)
        return result

    return bulk_create


def _bulk_update(original: Any) -> Any:
    @functools.wraps(original)
    def bulk_update(self: QuerySet[Any], objs: Any, fields: Any, *args: Any, **kwargs: Any) -> Any:
        options = _capturing(self.model)
        if options is None:
            return original(self, objs, fields, *args, **kwargs)
        objs = list(objs)
        using = _write_db(self)
        with transaction.atomic(using=using, savepoint=False):
            outbox.lock(using)
            pks = [obj.pk for obj in objs]
            # Locked: no other writer may change their keys between this read
            # and the update.
            old_keys = _keys_by_pk(
                options,
                self.model._base_manager.using(using).select_for_update().filter(pk__in=pks),
            )
            with _no_capture():
                result = original(self, objs, fields, *args, **kwargs)
            changed = sorted(set(fields) & options.field_names)
            _write_upserts(options, pks, using, changed=changed, old_keys=old_keys)
        return result

    return bulk_update


def _update(original: Any) -> Any:
    @functools.wraps(original)
    def update(self: QuerySet[Any], **kwargs: Any) -> Any:
        options = _capturing(self.model)
        if options is None:
            return original(self, **kwargs)
        using = _write_db(self)
        with transaction.atomic(using=using, savepoint=False):
            outbox.lock(using)
            # The rows to change, locked, then changed by primary key: the events
            # name exactly the rows the update changed, even when other writers
            # add or change matching rows meanwhile (a plain UPDATE would also
            # change rows committed between this read and it).
            pks = list(_locked(self, using).values_list("pk", flat=True))
            base = self.model._base_manager.using(using).filter(pk__in=pks)
            old_keys = _keys_by_pk(options, base)
            with _no_capture():
                result = original(base, **kwargs) if pks else 0
            changed = sorted(set(kwargs) & options.field_names)
            _write_upserts(options, list(old_keys), using, changed=changed, old_keys=old_keys)
        return result

    return update


def _locked(qs: QuerySet[Any], using: str) -> QuerySet[Any]:
    """``qs`` with its own rows locked for update (not the rows its filter joins,
    where the database can tell them apart)."""
    if connections[using].features.has_select_for_update_of:
        locked: QuerySet[Any] = qs.select_for_update(of=("self",))
    else:
        locked = qs.select_for_update()
    return locked


_installed = False


def install_queryset_capture() -> None:
    """Wrap the QuerySet methods that bypass model signals (once per process)."""
    global _installed
    if _installed:
        return
    QuerySet.bulk_create = _bulk_create(QuerySet.bulk_create)  # type: ignore[method-assign]
    QuerySet.bulk_update = _bulk_update(QuerySet.bulk_update)  # type: ignore[method-assign]
    QuerySet.update = _update(QuerySet.update)  # type: ignore[method-assign]
    _installed = True
