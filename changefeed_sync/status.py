"""Lag and health of targets (source side) and data sources (target side).

Shared by the admin and ``manage.py changefeed_status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.utils import timezone

from .models import DataSource, Event, Target
from .source import sequencer

LAG_CAP = 100_000


@dataclass
class TargetLag:
    events: int
    seconds: float


def target_lag(target: Target, using: str = "default") -> TargetLag:
    """Events after what the target has (delivered, or read from the feed) and their age."""
    position = max(target.delivered_seq, target.last_seen_seq or 0)
    sequencer.sequence(using)  # events that committed a moment ago count too
    pending = Event.objects.using(using).filter(position__gt=position)
    models = target.allowed_models()
    if models is not None:
        pending = pending.filter(model__in=models)
    count = pending[:LAG_CAP].count()
    oldest = pending.order_by("position").values_list("created_at", flat=True).first()
    seconds = (timezone.now() - oldest).total_seconds() if oldest else 0.0
    return TargetLag(count, seconds)


def target_rows(using: str = "default") -> list[dict[str, Any]]:
    rows = []
    for target in Target.objects.using(using).order_by("name"):
        lag = target_lag(target, using)
        rows.append(
            {
                "target": target.name,
                "state": "inactive"
                if not target.active
                else ("paused" if target.paused else "active"),
                "push": "yes" if target.webhook_url else "no",
                "delivered": target.delivered_seq,
                "read": target.last_seen_seq,
                "lag_events": lag.events,
                "lag_seconds": round(lag.seconds, 1),
                "last_error": target.last_error,
            }
        )
    return rows


def source_rows(using: str = "default") -> list[dict[str, Any]]:
    return [
        {
            "source": source.name,
            "checkpoint": source.checkpoint,
            "source_id": source.source_id,
            "last_sync_at": source.last_sync_at.isoformat() if source.last_sync_at else None,
            "last_error": source.last_error,
            "last_error_at": (
                source.last_error_at.isoformat()
                if source.last_error and source.last_error_at
                else None
            ),
        }
        for source in DataSource.objects.using(using).order_by("name")
    ]
