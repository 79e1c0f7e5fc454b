"""Delivery backends: where a push delivery runs.

A backend subclasses ``base.DeliveryBackend``: ``schedule(target_ids, using)``,
called after a commit that wrote events, and ``configuration_problems()`` for the
system checks. Choose one with ``CHANGEFEED_SYNC_DELIVERY_BACKEND``:

- ``changefeed_sync.source.delivery.inline.InlineBackend`` (default): a small pool of
  threads of this process delivers right after commit, to every target, and
  retries with backoff; a process that exits waits a few seconds for them;
- ``changefeed_sync.source.delivery.cloud_tasks.CloudTasksBackend``: one Cloud Tasks
  HTTP task per batch, with an OIDC token; Cloud Tasks retries;
- ``changefeed_sync.source.delivery.django_tasks.DjangoTasksBackend``: a task of
  Django's task framework (``django.tasks``, or the ``django-tasks`` backport);
- ``changefeed_sync.source.delivery.loopback.LoopbackBackend``: for tests, each batch
  handed in the committing thread to a receiver connected in this process.

What every backend sends, planned for many targets at once, is built by
``batches.py``.
"""
