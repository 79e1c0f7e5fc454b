"""manage.py changefeed_source_id [--reset]: this site's identity as a source."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from changefeed_sync import conf

from ...source import sequencer


class Command(BaseCommand):
    help = (
        "Show this site's source identity (sent with every feed page, snapshot and webhook); "
        "--reset draws a new one, e.g. after restoring the database from a backup: every "
        "target then stops with 'source was reset or replaced' until it runs a full Data Pull."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--reset", action="store_true", help="Draw a new identity.")
        parser.add_argument("--database", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"] or conf.feed_database()
        if options["reset"]:
            self.stdout.write(f"new source id {sequencer.reset_source_id(using)}")
        else:
            self.stdout.write(sequencer.state(using).source_id)
