"""manage.py changefeed_pull SOURCE: full copy of a source, all or nothing."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from changefeed_sync.models import DataPull, DataSource
from changefeed_sync.pull import execute


class Command(BaseCommand):
    help = "Copy every registered row of a Data Source into this site (a Data Pull)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", help="Name of the Data Source.")
        parser.add_argument("--database", default="default", help="Database alias to pull into.")
        parser.add_argument("--dry-run", action="store_true", help="Report, write nothing.")
        parser.add_argument(
            "--keep-missing", action="store_true", help="Keep rows the source does not have."
        )
        parser.add_argument(
            "--allow-mass-delete",
            action="store_true",
            help="Allow deleting more than half of a model's rows.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        try:
            source = DataSource.objects.using(using).get(name=options["source"])
        except DataSource.DoesNotExist:
            raise CommandError(f"no Data Source named {options['source']!r}") from None
        pull = DataPull.objects.using(using).create(
            source=source,
            dry_run=options["dry_run"],
            keep_missing=options["keep_missing"],
            allow_mass_delete=options["allow_mass_delete"],
        )
        tty = sys.stdout.isatty()

        def progress(message: str) -> None:
            if tty:
                self.stdout.write(f"\r\033[K{message}", ending="")
                self.stdout.flush()
            else:
                self.stdout.write(message)

        pull = execute(pull, using=using, progress=progress)
        if tty:
            self.stdout.write("")
        if pull.status != DataPull.SUCCEEDED:
            raise CommandError(f"pull #{pull.pk} from {source.name} failed: {pull.error}")
        for label, c in pull.counts.items():
            self.stdout.write(
                f"{label}: {c['created']} created, {c['updated']} updated, "
                f"{c['deleted']} deleted, {c['unchanged']} unchanged"
            )
        self.stdout.write(
            f"pull #{pull.pk} succeeded in {pull.duration}; nothing written (dry run)"
            if pull.dry_run
            else f"pull #{pull.pk} succeeded in {pull.duration}; checkpoint {pull.position}"
        )
