"""manage.py changefeed_sync SOURCE [--follow]: apply a source's feed from the checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from changefeed_sync.exceptions import ChangefeedError
from changefeed_sync.models import DataSource
from changefeed_sync.target.follow import sync


class _Stop(BaseException):
    """Raised by the signal handler; BaseException so no retry loop swallows it."""


class Command(BaseCommand):
    help = "Pull the feed of a Data Source from its checkpoint and apply it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", help="Name of the Data Source.")
        parser.add_argument(
            "--follow",
            action="store_true",
            help=(
                "Keep following (the streamed feed, or long-polls) until SIGINT/SIGTERM; "
                "retry when the source is down."
            ),
        )
        parser.add_argument("--database", default=None, help="Database alias to apply to.")
        parser.add_argument("--limit", type=int, default=None, help="Events per request.")
        parser.add_argument(
            "--wait", type=float, default=None, help="Long-poll seconds (--follow)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"] or "default"
        try:
            source = DataSource.objects.using(using).get(name=options["source"])
        except DataSource.DoesNotExist:
            names = ", ".join(DataSource.objects.using(using).values_list("name", flat=True))
            raise CommandError(
                f"no Data Source named {options['source']!r} (known: {names or 'none'})"
            ) from None
        self._configure_logging(options["verbosity"])
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()
            # Interrupt a long-poll or a stream at once; an apply in progress is one
            # transaction and simply rolls back, the checkpoint with it.
            raise _Stop

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.stdout.write(f"{source.name}: syncing from checkpoint {source.checkpoint}")
        try:
            result = sync(
                source,
                using=using,
                follow=options["follow"],
                stop=stop,
                limit=options["limit"],
                wait=options["wait"],
            )
        except _Stop:
            source.refresh_from_db(using=using)
            self.stdout.write(f"{source.name}: stopped at checkpoint {source.checkpoint}")
            return
        except ChangefeedError as exc:
            raise CommandError(f"{source.name}: {exc}") from exc
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stdout.write(
            f"{source.name}: applied {result.stats.events} events in {result.pages} pages, "
            f"checkpoint {result.checkpoint}"
        )

    def _configure_logging(self, verbosity: int) -> None:
        logger = logging.getLogger("changefeed_sync")
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler(self.stderr._out)  # type: ignore[call-overload]
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
