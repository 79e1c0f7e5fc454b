"""On PostgreSQL, a save whose event needs nothing but the instance sends its
row and its event as one statement (``outbox_pg``): in autocommit one round
trip instead of four, still one transaction; inside ``atomic()`` one instead
of two."""

from __future__ import annotations

import functools
from typing import Any

from django.db import connections, models, transaction

from .. import outbox
from ..registry import ModelOptions
from . import outbox_pg, routes
from .events import SNAPSHOT_ATTR, capturing, has_expression, upsert_change

PLAN_ATTR = "_changefeed_one_statement"


class Plan:
    """A save whose row statements carry their own event (PostgreSQL)."""

    __slots__ = ("options", "using", "rewritten")

    def __init__(self, options: ModelOptions, using: str) -> None:
        self.options = options
        self.using = using
        self.rewritten = 0  # row statements sent with their event


def one_statement_plan(
    instance: models.Model, using: str, args: Any, kwargs: dict[str, Any]
) -> Plan | None:
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
    options = capturing(type(instance))
    if options is None or args or kwargs.get("raw") or kwargs.get("update_fields") is not None:
        return None
    concrete: Any = instance._meta.concrete_model  # a proxy's parents are not tables
    if not options.payload_in_memory or concrete._meta.parents:
        return None
    routing = routes.routing(using)
    if routing is not None and (
        routing.concerned(options.label) or routing.moved_by(options.label, None)
    ):
        return None  # filtered Targets' routes need the rows read before and after
    if not connection.in_atomic_block and not connection.get_autocommit():
        return None  # a transaction managed by hand (set_autocommit(False))
    if not instance._state.adding and SNAPSHOT_ATTR not in instance.__dict__:
        return None
    if has_expression(instance):
        return None
    return Plan(options, using)


class _Rewriter:
    """Execute wrapper for one ``_do_insert`` / ``_do_update``: sends its row
    statement with the event (``outbox_pg``)."""

    def __init__(self, instance: models.Model, plan: Plan) -> None:
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
        if not has_expression(self.instance):
            # The row's values are final here: the fields' pre_save (auto_now and
            # the like) ran while Django compiled this statement (Django 6.0+
            # runs it once before, too, and the compiled one is what is stored).
            change = upsert_change(plan.options, self.instance, created, plan.using)
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
                    change = upsert_change(
                        plan.options, self.instance, created, plan.using, pk=pk, stored=True
                    )
                outbox.write(plan.using, [change.event()], locked=True)
        return result


def wrap_row_writes(model: type[models.Model]) -> None:
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
