"""manage.py changefeed_pull SOURCE: full copy of a source, all or nothing.

On a terminal the progress is a bar per model, redrawn in place; otherwise
(a log, a pipe, a CI job) plain lines, one per tenth of each model.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from changefeed_sync import rows
from changefeed_sync.models import DataPull, DataSource
from changefeed_sync.target.pull import Progress, execute, fail_stale_pulls

_BAR = 30


class _Bar:
    """A progress bar redrawn on one line, a new line per model."""

    def __init__(self, out: OutputWrapper) -> None:
        self.out = out
        self.key: tuple[str, str] | None = None
        self.started = time.monotonic()

    def __call__(self, p: Progress) -> None:
        if p.phase == "done":
            self.end()
            return
        if (p.label, p.phase) != self.key:
            self.end()
            self.key = (p.label, p.phase)
            self.started = time.monotonic()
        if p.phase == "delete":
            line = f"[{p.model}/{p.models}] {p.label}: deleted {p.done:,} rows the source lacks"
        else:
            share = p.done / p.total if p.total else 1.0
            filled = round(share * _BAR)
            rate = p.done / max(time.monotonic() - self.started, 1e-6)
            line = (
                f"[{p.model}/{p.models}] {p.label:<24} [{'#' * filled}{'.' * (_BAR - filled)}] "
                f"{p.done:,}/{p.total:,} {share:4.0%} {rate:,.0f} rows/s"
                + (" (second pass: references)" if p.phase == "relink" else "")
            )
        self.out.write(f"\r\033[K{line}", ending="")
        self.out.flush()

    def end(self) -> None:
        if self.key is not None:
            self.out.write("")
            self.key = None


class _Lines:
    """Plain progress lines: a model's start, each tenth of it, and its end."""

    def __init__(self, out: OutputWrapper) -> None:
        self.out = out
        self.key: tuple[str, str] | None = None
        self.step = -1

    def __call__(self, p: Progress) -> None:
        if p.phase == "done":
            return
        if p.phase == "delete":
            self.out.write(f"{p.label}: deleted {p.done:,} rows the source lacks")
            return
        if (p.label, p.phase) != self.key:
            self.key, self.step = (p.label, p.phase), -1
        step = int(10 * p.done / p.total) if p.total else 10
        if step != self.step:
            self.step = step
            again = " (second pass: references)" if p.phase == "relink" else ""
            self.out.write(
                f"[{p.model}/{p.models}] {p.label}: {p.done:,} of {p.total:,} rows "
                f"({step * 10}%){again}"
            )


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

    def run_from_argv(self, argv: list[str]) -> None:
        # Run by manage.py, this process does nothing but the pull: pausing the
        # collector while pages are built is its own business (it saves a share of the
        # pull's CPU). call_command() from a process that does more does not.
        rows.allow_collection_pauses()
        super().run_from_argv(argv)

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        try:
            source = DataSource.objects.using(using).get(name=options["source"])
        except DataSource.DoesNotExist:
            raise CommandError(f"no Data Source named {options['source']!r}") from None
        for pk in fail_stale_pulls(using):
            stale = DataPull.objects.using(using).get(pk=pk)
            self.stderr.write(f"pull #{pk} of {stale.source} marked failed: {stale.error}")
        pull = DataPull.objects.using(using).create(
            source=source,
            dry_run=options["dry_run"],
            keep_missing=options["keep_missing"],
            allow_mass_delete=options["allow_mass_delete"],
        )
        progress = _Bar(self.stdout) if self.stdout.isatty() else _Lines(self.stdout)
        try:
            pull = execute(pull, using=using, progress=progress)
        finally:
            if isinstance(progress, _Bar):
                progress.end()
        if pull.status != DataPull.SUCCEEDED:
            raise CommandError(f"pull #{pull.pk} from {source.name} failed: {pull.error}")
        for label, c in pull.counts.items():
            files = ""
            if any(k.startswith("files_") for k in c):
                files = (
                    f"; files: {c.get('files_fetched', 0)} transferred, "
                    f"{c.get('files_unchanged', 0)} unchanged, {c.get('files_missing', 0)} "
                    "missing on the source"
                )
            self.stdout.write(
                f"{label}: {c['created']} created, {c['updated']} updated, "
                f"{c['deleted']} deleted, {c['unchanged']} unchanged{files}"
            )
        if "files missing" in pull.progress:
            self.stdout.write(pull.progress)
        self.stdout.write(
            f"pull #{pull.pk} succeeded in {pull.duration}; nothing written (dry run)"
            if pull.dry_run
            else f"pull #{pull.pk} succeeded in {pull.duration}; checkpoint {pull.position}"
        )
