"""manage.py changefeed_prune: drop outbox events older than the retention period."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from changefeed_sync import conf
from changefeed_sync.models import Event, OutboxState


def prune(older_than: timedelta, using: str) -> int:
    """Delete old events; record how far, so older cursors get 'cursor expired'."""
    cutoff = timezone.now() - older_than
    with transaction.atomic(using=using):
        # Only events with a position: one still waiting for the sequencer
        # (its transaction committed a moment ago) has not been served yet.
        old = Event.objects.using(using).filter(created_at__lt=cutoff, position__isnull=False)
        last = old.aggregate(m=Max("position"))["m"]
        if last is None:
            return 0
        deleted, _ = Event.objects.using(using).filter(position__lte=last).delete()
        state, _ = OutboxState.objects.using(using).get_or_create(id=1)
        if last > state.pruned_through:
            OutboxState.objects.using(using).filter(id=1).update(pruned_through=last)
    return int(deleted)


class Command(BaseCommand):
    help = "Delete outbox events older than --days (default CHANGEFEED_SYNC_RETENTION_DAYS)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=float, default=None)
        parser.add_argument("--database", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"] if options["days"] is not None else conf.retention_days()
        using = options["database"] or conf.feed_database()
        deleted = prune(timedelta(days=days), using)
        self.stdout.write(f"deleted {deleted} outbox events older than {days:g} days")
