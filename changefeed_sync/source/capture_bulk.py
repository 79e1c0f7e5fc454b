"""Capture of the QuerySet methods that send no model signals: bulk_create,
bulk_update and update, wrapped once for every queryset, capturing only for
registered models. (``QuerySet.delete`` sends signals for models with
receivers: it needs nothing extra.)"""

from __future__ import annotations

import functools
from typing import Any

from django.db import connections, router, transaction
from django.db.models import QuerySet

from .. import outbox
from ..keys import resolve_keys
from ..registry import ModelOptions
from ..serialization import key_of_instance, key_of_row
from . import cascades, routes
from .events import capturing, no_capture, routed_before, write_upserts


def _write_db(qs: QuerySet[Any]) -> str:
    # The alias given with using(), else what the router says for writes.
    return getattr(qs, "_db", None) or router.db_for_write(qs.model)


def _keys_by_pk(options: ModelOptions, qs: QuerySet[Any]) -> dict[Any, list[Any]]:
    return {
        row[0]: list(key_of_row(options, row[1:])) for row in qs.values_list("pk", *options.lookups)
    }


def _bulk_create(original: Any) -> Any:
    @functools.wraps(original)
    def bulk_create(self: QuerySet[Any], objs: Any, *args: Any, **kwargs: Any) -> Any:
        options = capturing(self.model)
        if options is None:
            return original(self, objs, *args, **kwargs)
        objs = list(objs)
        using = _write_db(self)
        with transaction.atomic(using=using, savepoint=False):
            outbox.lock(using)
            before = _existing_before(options, self.model, objs, using, kwargs)
            with no_capture():
                result = original(self, objs, *args, **kwargs)
            pks = [obj.pk for obj in result]
            if any(pk is None for pk in pks):
                # ignore_conflicts / update_conflicts on some databases: no ids
                # come back, so find the rows by natural key.
                keys = [key_of_instance(options, obj) for obj in objs]
                pks = list(resolve_keys(options, keys, using).values())
            write_upserts(options, pks, using, changed=None, before=before)
        return result

    return bulk_create


def _bulk_update(original: Any) -> Any:
    @functools.wraps(original)
    def bulk_update(self: QuerySet[Any], objs: Any, fields: Any, *args: Any, **kwargs: Any) -> Any:
        options = capturing(self.model)
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
            before = routed_before(options, pks, using)
            changed = sorted(set(fields) & options.field_names)
            cascade = cascades.before_write(options, pks, changed, using)
            with no_capture():
                result = original(self, objs, fields, *args, **kwargs)
            _write_moved(options, pks, using, cascade, changed, old_keys, before)
        return result

    return bulk_update


def _update(original: Any) -> Any:
    @functools.wraps(original)
    def update(self: QuerySet[Any], **kwargs: Any) -> Any:
        options = capturing(self.model)
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
            before = routed_before(options, pks, using)
            changed = sorted(set(kwargs) & options.field_names)
            cascade = cascades.before_write(options, pks, _names(options, kwargs), using)
            with no_capture():
                result = original(base, **kwargs) if pks else 0
            _write_moved(options, list(old_keys), using, cascade, changed, old_keys, before)
        return result

    return update


def _names(options: ModelOptions, kwargs: dict[str, Any]) -> list[str]:
    """Field names of an update's keyword arguments (a foreign key may be given by its
    column, ``country_id``)."""
    names = []
    for given in kwargs:
        for f in options.model._meta.concrete_fields:
            if given in (f.name, f.attname):
                names.append(f.name)
    return names


def _write_moved(
    options: ModelOptions,
    pks: list[Any],
    using: str,
    cascade: cascades.Cascade | None,
    changed: list[str],
    old_keys: dict[Any, list[Any]],
    before: dict[Any, frozenset[int]] | None,
) -> None:
    """The events of rows changed in bulk, with those of the children the change moved
    in or out of filters (cascades.py): the ones that left before, those that came in
    after."""
    leavers, joiners = cascades.events(cascade, using) if cascade else ([], [])
    outbox.write(using, leavers, locked=True)
    write_upserts(options, pks, using, changed=changed, old_keys=old_keys, before=before or {})
    outbox.write(using, joiners, locked=True)


def _existing_before(
    options: ModelOptions, model: Any, objs: list[Any], using: str, kwargs: dict[str, Any]
) -> dict[Any, frozenset[int]] | None:
    """For the filtered Targets, which of them have the rows a bulk_create with
    ``update_conflicts`` or ``ignore_conflicts`` may find already there (locked, by
    natural key); None for a plain bulk_create, whose rows are all new."""
    if not (kwargs.get("update_conflicts") or kwargs.get("ignore_conflicts")):
        return None
    if routes.concerned(options, using) is None:
        return None
    keys = [key_of_instance(options, obj) for obj in objs]
    pks = list(resolve_keys(options, keys, using).values())
    list(model._base_manager.using(using).select_for_update().filter(pk__in=pks).values("pk"))
    return routed_before(options, pks, using) or {}


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
