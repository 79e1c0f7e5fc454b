"""Delivery backends: where a push delivery runs.

A backend is a class with ``schedule(target_ids, using)``, called after a
commit that wrote events. Choose one with ``CHANGEFEED_SYNC_DELIVERY_BACKEND``:

- ``changefeed_sync.delivery.inline.InlineBackend`` (default): a thread per
  target in this process delivers right after commit and retries with backoff;
- ``changefeed_sync.delivery.cloud_tasks.CloudTasksBackend``: one Cloud Tasks
  HTTP task per batch, with an OIDC token; Cloud Tasks retries;
- ``changefeed_sync.delivery.django_tasks.DjangoTasksBackend``: a task of
  Django's task framework (``django.tasks``, or the ``django-tasks`` backport).
"""
