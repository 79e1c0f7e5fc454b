"""manage.py changefeed_push: deliver what is due to every pushed-to Target (the sweeper).

Deliveries start after each commit, from the process that committed. This command
picks up what such a process left behind (it was killed, or exited before its
deliveries ended and its exit wait ran out) and retries whose backoff has passed.
Run it from cron, or with ``--loop SECONDS`` as a small worker. With the inline
backend (or none) it delivers here, through the same pool of threads as a web
process; with Cloud Tasks or Django tasks it hands the targets to that queue.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from changefeed_sync.models import Target
from changefeed_sync.source import push
from changefeed_sync.source.delivery.inline import InlineBackend, pool


class Command(BaseCommand):
    help = "Deliver pending events to every Target whose backoff has passed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default="default")
        parser.add_argument(
            "--loop", type=float, default=0, metavar="SECONDS", help="Repeat every SECONDS."
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=120.0,
            metavar="SECONDS",
            help="Longest wait for one round of inline deliveries (default 120).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        chosen = push.backend()
        while True:
            due = push.due_targets(using)
            if chosen is not None and not isinstance(chosen, InlineBackend):
                # Cloud Tasks / Django tasks: hand the work to the configured queue.
                chosen.schedule(due, using)
                self.stdout.write(f"{len(due)} target(s) handed to {type(chosen).__name__}")
            elif due:
                deliveries = pool()
                deliveries.schedule(due, using)
                finished = deliveries.wait_idle(options["wait"])
                self._report(due, using, finished)
            if not options["loop"]:
                return
            time.sleep(options["loop"])

    def _report(self, due: list[int], using: str, finished: bool) -> None:
        for target in Target.objects.using(using).filter(pk__in=due).order_by("name"):
            if target.failures:
                state = f"failed ({target.failures} in a row): {target.last_error[:200]}"
            else:
                state = f"delivered up to {target.delivered_seq}"
            self.stdout.write(f"target {target.name}: {state}")
        if not finished:
            self.stdout.write(self.style.WARNING("some deliveries were still running"))
