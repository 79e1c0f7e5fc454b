"""Tasks queued before the upgrade name ``changefeed_sync.delivery.django_tasks.deliver``:
the same task, at its old path."""

from __future__ import annotations

from ..source.delivery.django_tasks import deliver as deliver

__all__ = ["deliver"]
