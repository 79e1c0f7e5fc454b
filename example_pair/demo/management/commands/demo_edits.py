"""manage.py demo_edits (source): a stream of edits, one every --interval seconds.

Each edit is one transaction of ordinary ORM writes (save, create, delete,
QuerySet.update, bulk_update), all captured by changefeed_sync. For each edit one JSON
line is printed: what was done, and the state the target should end up in
(``expect``), which example_pair/run watches for on the target.

``--webhook-url URL`` makes the Target push every change to URL (the target's
/sync/webhook/<source>/); without it the Target is left to pull (the follower).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import django
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.db.models import Max

from changefeed_sync.models import Event, Target
from demo.models import Copy, Country, Language


class _Stop(BaseException):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def _copy_key(copy: Copy) -> list[str]:
    return [copy.language.country.code, copy.language.code, copy.key]


class Command(BaseCommand):
    help = "Make a stream of edits to the demo content (on the source)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, default=0, help="Edits to make; 0: until stopped.")
        parser.add_argument("--interval", type=float, default=2.0, help="Seconds between edits.")
        parser.add_argument("--target", default="target", help="Name of the Target.")
        parser.add_argument("--webhook-url", default="", help="Push to this URL (empty: no push).")

    def handle(self, *args: Any, **options: Any) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_stop)
        updated = Target.objects.filter(name=options["target"]).update(
            webhook_url=options["webhook_url"], paused=False, failures=0, next_attempt_at=None
        )
        if not updated:
            raise CommandError(f"no Target named {options['target']!r}")
        self.target_name = options["target"]
        self.push = bool(options["webhook_url"])
        n = 0
        try:
            while not options["count"] or n < options["count"]:
                if n:
                    time.sleep(options["interval"])
                n += 1
                with transaction.atomic():
                    _write_lock_first()
                    text, expect = self.edit(n)
                self.emit({"n": n, "t": time.time(), "text": text, "expect": expect})
            if self.push:
                self.wait_for_delivery()
            self.emit({"done": True, "edits": n})
        except _Stop:
            pass
        finally:
            # Stopping from here on needs no clean-up: a signal just ends the process.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)

    def emit(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def edit(self, n: int) -> tuple[str, list[dict[str, Any]]]:
        """Edit number n: one of five kinds, in turn."""
        kind = n % 5
        if kind == 1:
            copy = Copy.objects.select_related("language__country").get(
                language__country__code="fr", language__code="fr", key="welcome"
            )
            copy.value = f"Bienvenue ! (edit {n})"
            copy.save()
            return (
                f"Copy {copy}: value = {copy.value!r}",
                [{"model": "demo.copy", "key": _copy_key(copy), "data": {"value": copy.value}}],
            )
        if kind == 2:
            country = Country.objects.get(code="de")
            country.name = f"Deutschland (edit {n})"
            country.save()
            return (
                f"Country de: name = {country.name!r}",
                [{"model": "demo.country", "key": ["de"], "data": {"name": country.name}}],
            )
        if kind == 3:
            language = Language.objects.select_related("country").get(country__code="es", code="es")
            copy = Copy.objects.create(language=language, key=f"promo-{n}", value=f"¡Oferta {n}!")
            return (
                f"Copy {copy} created: value = {copy.value!r}",
                [{"model": "demo.copy", "key": _copy_key(copy), "data": {"value": copy.value}}],
            )
        if kind == 4:
            # The oldest promotion, once there are two: a row created by one edit and
            # deleted by the next could come and go between two looks at the target.
            promos = Copy.objects.select_related("language__country").filter(
                key__startswith="promo-"
            )
            promo = promos.order_by("pk").first() if promos.count() > 1 else None
            if promo is not None:
                key = _copy_key(promo)
                promo.delete()
                return f"Copy {'/'.join(key)} deleted", [
                    {"model": "demo.copy", "key": key, "deleted": True}
                ]
        # kind 0 (or nothing to delete): a QuerySet.update of several rows at once.
        copies = Copy.objects.select_related("language__country").filter(key="cart.checkout")
        value = f"→ checkout (edit {n})"
        keys = [_copy_key(copy) for copy in copies]
        copies.update(value=value)
        return (
            f"{len(keys)} copies 'cart.checkout' (QuerySet.update): value = {value!r}",
            [{"model": "demo.copy", "key": key, "data": {"value": value}} for key in keys],
        )

    def wait_for_delivery(self, timeout: float = 15.0) -> None:
        """Pushes run in a thread of this process: let it deliver the last edits."""
        last = Event.objects.aggregate(last=Max("id"))["last"] or 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            target = Target.objects.get(name=self.target_name)
            if target.delivered_seq >= last:
                return
            time.sleep(0.05)
        self.stderr.write(f"pushes to {self.target_name} not delivered after {timeout} s")


def _write_lock_first() -> None:
    """What ``transaction_mode = "IMMEDIATE"`` (settings.py) does on Django >= 5.1: take
    SQLite's write lock as the transaction begins. An edit reads, then writes; begun
    as a read, it fails at once with "database is locked" when another connection
    (the push recorder, the server) wrote meanwhile, whatever the timeout."""
    if django.VERSION < (5, 1) and connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM demo_country WHERE id = -1")  # matches no row
