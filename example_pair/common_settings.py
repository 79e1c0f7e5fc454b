"""Settings shared by the two demo sites (``source.settings`` and ``target.settings``).

Each site keeps its data in its own database: a SQLite file under ``example_pair/var/``
by default, or the database named by ``DATABASE_URL``:

* ``postgres://user[:password]@host[:port]/dbname`` (``postgresql://`` too);
* ``mysql://user[:password]@host[:port]/dbname`` (``mariadb://`` too);
* ``sqlite:///relative/path.sqlite3`` or ``sqlite:////absolute/path.sqlite3``.

This is a demo on the loopback interface: DEBUG is on and the secret key is fixed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import django

EXAMPLE_DIR = Path(__file__).resolve().parent
VAR_DIR = Path(os.environ.get("EXAMPLE_PAIR_VAR", EXAMPLE_DIR / "var"))

_ENGINES = {
    "postgres": "postgresql",
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}
_DEFAULT_PORTS = {"postgresql": "5432", "mysql": "3306"}


def parse_database_url(url: str) -> dict[str, Any]:
    """One ``DATABASES`` entry from a database URL (dj-database-url's conventions)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"DATABASE_URL is not a URL: {url!r}")
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ValueError(f"DATABASE_URL names no SQLite file: {url!r}")
        return sqlite_database(Path(path))
    vendor = _ENGINES.get(scheme)
    if vendor is None:
        raise ValueError(
            f"DATABASE_URL has an unsupported scheme {scheme!r} "
            "(use postgres://, mysql://, mariadb:// or sqlite:///)"
        )
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ValueError(f"DATABASE_URL names no database: {url!r}")
    config: dict[str, Any] = {
        "ENGINE": f"django.db.backends.{vendor}",
        "NAME": name,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or _DEFAULT_PORTS[vendor]),
    }
    if vendor == "mysql":
        _ensure_mysql_driver()
        # Read committed: a long-poll must see events committed while it waits.
        config["OPTIONS"] = {"charset": "utf8mb4", "isolation_level": "read committed"}
    return config


def sqlite_database(path: Path) -> dict[str, Any]:
    # Several processes write to the file (server threads, the follower, the edits, the
    # push thread): wait up to 30 s for the write lock. And take it when a transaction
    # begins: a transaction that reads first and writes later (get(), then save()) fails
    # at once with "database is locked" if another process wrote in between, whatever
    # the timeout (SQLite's deadlock avoidance). Django >= 5.1 can BEGIN IMMEDIATE.
    options: dict[str, Any] = {"timeout": 30}
    if django.VERSION >= (5, 1):
        options["transaction_mode"] = "IMMEDIATE"
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path), "OPTIONS": options}


def _ensure_mysql_driver() -> None:
    """Django wants MySQLdb (mysqlclient); PyMySQL can stand in for it."""
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        try:
            import pymysql
        except ImportError:
            return  # Django's own error message names mysqlclient
        pymysql.install_as_MySQLdb()


def database(role: str) -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return parse_database_url(url)
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    return sqlite_database(VAR_DIR / f"{role}.sqlite3")


SECRET_KEY = "example-pair-demo-only-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "changefeed_sync",
    "demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
STATIC_URL = "/static/"
MEDIA_URL = "/media/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "changefeed_sync": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
