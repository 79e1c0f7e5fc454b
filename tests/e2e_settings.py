"""Settings of one standalone site (a source or a target) for the end-to-end tests.

Each site is its own process tree (``runserver``, ``manage.py`` commands) with its own
database, named by the environment variable ``CFS_DATABASE_URL``:

* ``sqlite:///relative/path.sqlite3`` or ``sqlite:////absolute/path.sqlite3``
  (dj-database-url's convention: what follows ``sqlite:///`` is the path);
* ``postgres://user[:password]@host[:port]/dbname`` (``postgresql://`` too);
* ``mysql://user[:password]@host[:port]/dbname`` (``mariadb://`` too).

See tests/servers.py for how the tests start and drive these sites.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

from django.apps import AppConfig

from tests import dbs
from tests.site_settings import *  # noqa: F403 - apps, middleware, templates

_DEFAULT_PORTS = {"postgresql": "5432", "mysql": "3306"}


def parse_database_url(url: str) -> dict[str, Any]:
    """One ``DATABASES`` entry from a database URL (no third-party parser needed)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"CFS_DATABASE_URL is not a URL: {url!r}")
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ValueError(f"CFS_DATABASE_URL names no SQLite file: {url!r}")
        # Several processes (server threads, commands) share the file: wait for locks.
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": path, "OPTIONS": {"timeout": 30}}
    engines = {
        "postgres": "postgresql",
        "postgresql": "postgresql",
        "mysql": "mysql",
        "mariadb": "mysql",
    }
    vendor = engines.get(scheme)
    if vendor is None:
        raise ValueError(f"CFS_DATABASE_URL has an unsupported scheme {scheme!r}: {url!r}")
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ValueError(f"CFS_DATABASE_URL names no database: {url!r}")
    config: dict[str, Any] = {
        "ENGINE": f"django.db.backends.{vendor}",
        "NAME": name,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or _DEFAULT_PORTS[vendor]),
    }
    if vendor == "mysql":
        dbs.ensure_mysql_driver()
        config["OPTIONS"] = {"charset": "utf8mb4", "isolation_level": "read committed"}
    return config


_url = os.environ.get("CFS_DATABASE_URL")
if not _url:
    raise RuntimeError("tests.e2e_settings needs CFS_DATABASE_URL (see the module docstring)")

DATABASES = {"default": parse_database_url(_url)}

SECRET_KEY = "changefeed-sync-e2e-not-a-secret"  # test value only
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

# A follower retries an unreachable source with backoff; the default ceiling (60 s) would
# make the "source restarts" test wait for minutes.
CHANGEFEED_SYNC_RETRY_MAX_DELAY = 1.0
if os.environ.get("CFS_DELIVERY_RETRY_DELAYS"):
    CHANGEFEED_SYNC_DELIVERY_RETRY_DELAYS = [
        float(x) for x in os.environ["CFS_DELIVERY_RETRY_DELAYS"].split(",")
    ]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "plain",
        },
    },
    "loggers": {
        "changefeed_sync": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}


# Sites of tests/test_increment_files.py: their own media directory, and Document
# registered with its file field (by the app below, once the models are loaded).
if os.environ.get("CFS_E2E_MEDIA_ROOT"):
    MEDIA_ROOT = os.environ["CFS_E2E_MEDIA_ROOT"]


class DocumentFiles(AppConfig):
    name = "tests"
    label = "cfs_e2e_document_files"

    def ready(self) -> None:
        import changefeed_sync
        from tests.testapp.models import Document

        changefeed_sync.register(Document, natural_key=["slug"], file_fields=["attachment"])


if os.environ.get("CFS_E2E_DOCUMENT_FILES"):
    INSTALLED_APPS = [*INSTALLED_APPS, "tests.e2e_settings.DocumentFiles"]  # noqa: F405
