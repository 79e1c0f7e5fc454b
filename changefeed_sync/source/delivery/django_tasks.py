"""Deliver through Django's task framework: ``django.tasks`` on Django 6, the
``django-tasks`` backport before. Any of its backends (database, RQ, ...)
then runs the deliveries in a worker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from .. import push
from .base import DeliveryBackend

try:  # Django >= 6.0
    from django.tasks import task  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on the Django version
    from django_tasks import task  # type: ignore[no-redef,import-not-found,unused-ignore]


@task()  # type: ignore[untyped-decorator,unused-ignore]
def deliver(target_id: int, using: str = "default") -> None:
    retry_in = push.deliver_pending(target_id, using)
    if retry_in is not None and retry_in > 0:
        # (No immediate re-enqueue: with an immediate backend that would recurse.)
        _enqueue(target_id, using, retry_in)


def _enqueue(target_id: int, using: str, delay: float = 0.0) -> Any:
    if delay > 0:
        try:
            return deliver.using(run_after=timezone.now() + timedelta(seconds=delay)).enqueue(
                target_id, using
            )
        except Exception:  # the backend cannot defer: the next commit retries
            return None
    return deliver.enqueue(target_id, using)


class DjangoTasksBackend(DeliveryBackend):
    """Runs in a worker of Django's task framework: one task enqueued per target and
    commit (a row or a message in its backend's store); the worker posts and retries."""

    def schedule(self, target_ids: list[int], using: str) -> None:
        for target_id in target_ids:
            _enqueue(target_id, using)
