"""manage.py changefeed_status: every Target (source side) and Data Source (target side)."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from changefeed_sync.status import source_rows, target_rows


class Command(BaseCommand):
    help = "Show delivery lag of every Target and the checkpoint of every Data Source."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default="default")
        parser.add_argument("--json", action="store_true", help="Machine-readable output.")

    def handle(self, *args: Any, **options: Any) -> None:
        targets = target_rows(options["database"])
        sources = source_rows(options["database"])
        if options["json"]:
            self.stdout.write(json.dumps({"targets": targets, "sources": sources}, indent=2))
            return
        self.stdout.write("Targets (this site is their source):")
        if not targets:
            self.stdout.write("  none")
        for t in targets:
            self.stdout.write(
                f"  {t['target']}: {t['state']}, push {t['push']}, delivered {t['delivered']}, "
                f"read {t['read']}, lag {t['lag_events']} events / {t['lag_seconds']} s"
                + (f", last error: {t['last_error']}" if t["last_error"] else "")
            )
        self.stdout.write("Data Sources (this site is their target):")
        if not sources:
            self.stdout.write("  none")
        for s in sources:
            self.stdout.write(
                f"  {s['source']}: checkpoint {s['checkpoint']}"
                + (f" of source id {s['source_id']}" if s["source_id"] else "")
                + f", last sync {s['last_sync_at']}"
                + (
                    f", last error ({s['last_error_at'] or 'time unknown'}): {s['last_error']}"
                    if s["last_error"]
                    else ""
                )
            )
