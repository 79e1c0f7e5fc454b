"""manage.py demo_watch (target): print each demo row that changes, as it changes.

It polls the database every --interval seconds and compares the rows, by natural key,
with what it saw before; one JSON line per changed or deleted row. The first line,
``{"ready": ...}``, says it has read the starting state.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import close_old_connections

from demo.models import Copy, Country, Language

Snapshot = dict[tuple[str, tuple[str, ...]], dict[str, Any]]


class _Stop(BaseException):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def snapshot() -> Snapshot:
    rows: Snapshot = {}
    for code, name in Country.objects.values_list("code", "name"):
        rows[("demo.country", (code,))] = {"name": name}
    for country, code, name in Language.objects.values_list("country__code", "code", "name"):
        rows[("demo.language", (country, code))] = {"name": name}
    for country, language, key, value in Copy.objects.values_list(
        "language__country__code", "language__code", "key", "value"
    ):
        rows[("demo.copy", (country, language, key))] = {"value": value}
    return rows


class Command(BaseCommand):
    help = "Print changes of the demo content as they appear in this site's database."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--interval", type=float, default=0.05)

    def handle(self, *args: Any, **options: Any) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_stop)
        try:
            before = snapshot()
            self.emit({"ready": True, "rows": len(before)})
            while True:
                time.sleep(options["interval"])
                close_old_connections()
                now = time.time()
                after = snapshot()
                for (model, key), data in after.items():
                    if before.get((model, key)) != data:
                        self.emit({"t": now, "model": model, "key": list(key), "data": data})
                for model, key in before.keys() - after.keys():
                    self.emit({"t": now, "model": model, "key": list(key), "deleted": True})
                before = after
        except _Stop:
            pass
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)

    def emit(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message, ensure_ascii=False) + "\n")
        sys.stdout.flush()
