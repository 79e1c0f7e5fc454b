"""Django settings for the benchmarks (``bench/run.py``), apart from the test suite's.

Databases:

* ``default`` -- SQLite file in a fresh temporary directory: the source site;
* ``target``  -- a second SQLite file in the same directory: the target site;
* ``small_source``, ``small_target`` -- a second source/target pair, so the
  O(changes) benchmark can alternate between a small and a large table
  instead of measuring them minutes apart on a machine whose load drifts;
* ``postgres`` -- PostgreSQL database ``bench_changefeed`` (dropped and created
  fresh by ``run.py``), only when the server answers.

The PostgreSQL server is found with the test suite's variables (``CFS_PG_HOST``,
``CFS_PG_PORT``, ``CFS_PG_USER``, ``CFS_PG_PASSWORD``); ``CFS_BENCH_PG=0`` leaves
it out. Nothing here writes into the repository.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from bench import pg

SECRET_KEY = "changefeed-sync-bench-not-a-secret"  # benchmark value only
DEBUG = False  # DEBUG=True would keep every query in memory and skew the figures
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "changefeed_sync",
    "tests.testapp",
]

PG_DATABASE = "bench_changefeed"

# One directory per run; run.py removes it at exit.
BENCH_DIR = tempfile.mkdtemp(prefix="changefeed_sync-bench-")


def _sqlite(name: str) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(BENCH_DIR, f"{name}.sqlite3"),
        "OPTIONS": {"timeout": 30},
    }


DATABASES: dict[str, dict[str, Any]] = {
    "default": _sqlite("source"),
    "target": _sqlite("target"),
    "small_source": _sqlite("small_source"),
    "small_target": _sqlite("small_target"),
}

POSTGRES_UNAVAILABLE = pg.unavailable()
if not POSTGRES_UNAVAILABLE:
    DATABASES["postgres"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": PG_DATABASE,
        **pg.server(),
    }
