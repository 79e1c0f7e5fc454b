"""Former home of the delivery backends, now ``changefeed_sync.source.delivery``.

Kept for what may still name it after an upgrade: a task of Django's task framework
queued before it (``django_tasks.deliver``, by dotted path, retries deferred up to
10 hours). ``CHANGEFEED_SYNC_DELIVERY_BACKEND`` values naming a backend here are
read as their new paths (``conf.delivery_backend``).
"""
