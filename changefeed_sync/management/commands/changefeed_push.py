"""manage.py changefeed_push: deliver what is due to every pushed-to Target.

Deliveries start after each commit; this command picks up what a stopped
process left behind and retries whose backoff has passed (run it from cron,
or with --loop as a small worker).
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from changefeed_sync import push
from changefeed_sync.delivery.inline import InlineBackend


class Command(BaseCommand):
    help = "Deliver pending events to every Target whose backoff has passed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default="default")
        parser.add_argument(
            "--loop", type=float, default=0, metavar="SECONDS", help="Repeat every SECONDS."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        chosen = push.backend()
        while True:
            due = push.due_targets(using)
            if chosen is not None and not isinstance(chosen, InlineBackend):
                # Cloud Tasks / Django tasks: hand the work to the configured queue.
                chosen.schedule(due, using)
                due = []
            for target_id in due:
                retry_in = push.deliver_pending(target_id, using)
                state = "delivered" if retry_in is None else f"failed, retry in {retry_in:.0f} s"
                self.stdout.write(f"target {target_id}: {state}")
            if not options["loop"]:
                return
            time.sleep(options["loop"])
