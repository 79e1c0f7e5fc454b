"""Database servers used by the test suite, and what to do when one is missing.

Imported by ``tests/settings.py`` (to build ``DATABASES``) and by ``tests/conftest.py``
(fixtures, report header, CI enforcement). It must not import ``django.conf.settings``.

Three aliases are configured:

* ``default``  -- SQLite, in a file (threads and live servers can't share ``:memory:``);
* ``postgres`` -- PostgreSQL on 127.0.0.1:5432, user ``postgres`` (``CFS_PG_*``);
* ``mariadb``  -- MariaDB/MySQL on 127.0.0.1:3306, user ``root`` (``CFS_MARIADB_*``).

When settings are imported, each server is probed (TCP connect with a 1 s timeout, then a
real login through the driver). An unreachable server's alias is dropped from
``DATABASES`` and the reason is kept in :data:`UNAVAILABLE`, so
``databases="__all__"`` means "every server that is actually there". Tests that need a
specific alias go through :func:`require_alias` (or the ``db_alias`` / ``backend_pair``
fixtures), which skips with the reason -- or, under CI (``CI=true``), fails: in CI every
server must be present and nothing may be skipped for a missing service.

Environment variables (all optional):

``CFS_PG_HOST`` ``CFS_PG_PORT`` ``CFS_PG_USER`` ``CFS_PG_PASSWORD`` ``CFS_PG_NAME``
``CFS_PG_TEST_NAME``, the same with ``CFS_MARIADB_`` (``CFS_MYSQL_`` is accepted too), and
``CFS_DB_PROBE=0`` to skip probing (keeps every alias; used for mypy's settings import).

Two runs at once against the same servers would drop each other's ``test_changefeed``
databases: give one of them ``CFS_TEST_DB_SUFFIX=something`` (test databases become
``test_changefeed_something``).
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

ALIASES: tuple[str, ...] = ("default", "postgres", "mariadb")

#: alias -> human name of the backend, used in messages and as pytest ids.
LABELS: dict[str, str] = {"default": "sqlite", "postgres": "postgres", "mariadb": "mariadb"}

#: (source, target) pairs for cross-backend tests.
BACKEND_PAIRS: tuple[tuple[str, str], ...] = (
    ("default", "postgres"),
    ("postgres", "mariadb"),
    ("mariadb", "default"),
)

TCP_TIMEOUT = 1.0
CONNECT_TIMEOUT = 3  # seconds, for the driver login


def in_ci() -> bool:
    """True when running under CI, where a missing database server is an error."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@dataclass
class ServerInfo:
    alias: str
    display: str  # e.g. "PostgreSQL at 127.0.0.1:5432"
    available: bool = True
    reason: str = ""  # why it's unavailable
    version: str = ""  # server version, when probed
    extra: dict[str, Any] = field(default_factory=dict)


#: alias -> ServerInfo for every alias, filled by :func:`build_databases`.
SERVERS: dict[str, ServerInfo] = {}

#: alias -> reason, for aliases dropped from DATABASES.
UNAVAILABLE: dict[str, str] = {}


def _test_db_name() -> str:
    suffix = os.environ.get("CFS_TEST_DB_SUFFIX", "").strip()
    return f"test_changefeed_{suffix}" if suffix else "test_changefeed"


def _env(prefixes: tuple[str, ...], key: str, default: str) -> str:
    for prefix in prefixes:
        value = os.environ.get(f"{prefix}{key}")
        if value is not None and value != "":
            return value
    return default


# --------------------------------------------------------------------------- MySQL driver


def ensure_mysql_driver() -> str:
    """Make ``import MySQLdb`` work: mysqlclient if installed, else PyMySQL's shim.

    Returns the driver's name ("mysqlclient" or "PyMySQL"), or "" when neither is there.
    """
    try:
        import MySQLdb
    except ImportError:
        pass
    else:
        if getattr(MySQLdb, "__name__", "") == "pymysql" or "pymysql" in str(
            getattr(MySQLdb, "__file__", "")
        ):
            return "PyMySQL"
        return "mysqlclient"
    try:
        import pymysql
    except ImportError:
        return ""
    # Django checks MySQLdb.version_info against its minimum mysqlclient version
    # (1.4.3 for Django 4.2-5.2, 2.2.1 for Django 6.x); PyMySQL is API compatible
    # for what Django uses, so advertise a version Django accepts.
    if tuple(pymysql.version_info[:3]) < (2, 2, 1):
        pymysql.version_info = (2, 2, 7, "final", 0)
    pymysql.install_as_MySQLdb()
    return "PyMySQL"


# --------------------------------------------------------------------------- probing


def _tcp_check(host: str, port: int) -> str:
    """Return "" when host:port accepts a TCP connection, else an error text."""
    try:
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT):
            return ""
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _probe_postgres(cfg: dict[str, Any]) -> tuple[str, str]:
    """Return (error, server_version)."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not importable ({exc})", ""
    try:
        with psycopg.connect(
            host=cfg["HOST"],
            port=int(cfg["PORT"]),
            user=cfg["USER"],
            password=cfg["PASSWORD"] or None,
            dbname=cfg["NAME"],
            connect_timeout=CONNECT_TIMEOUT,
        ) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return "", f"PostgreSQL {row[0] if row else '?'}"
    except Exception as exc:  # any failure means "not usable"
        return _one_line(exc), ""


def _probe_mariadb(cfg: dict[str, Any]) -> tuple[str, str]:
    driver = ensure_mysql_driver()
    if not driver:
        return "neither mysqlclient nor PyMySQL is importable", ""
    import MySQLdb

    try:
        conn = MySQLdb.connect(
            host=cfg["HOST"],
            port=int(cfg["PORT"]),
            user=cfg["USER"],
            password=cfg["PASSWORD"],
            database=cfg["NAME"],
            connect_timeout=CONNECT_TIMEOUT,
        )
    except Exception as exc:
        return _one_line(exc), ""
    try:
        cur = conn.cursor()
        cur.execute("SELECT VERSION()")
        row = cur.fetchone()
        version = str(row[0]) if row else "?"
    except Exception as exc:
        return _one_line(exc), ""
    finally:
        conn.close()
    name = "MariaDB" if "mariadb" in version.lower() else "MySQL"
    return "", f"{name} {version} via {driver}"


# --------------------------------------------------------------------------- settings


def sqlite_config() -> dict[str, Any]:
    tmp = tempfile.gettempdir()
    pid = os.getpid()
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(tmp, f"changefeed_sync-{pid}.sqlite3"),
        # Tests use threads and live servers, so the test database must be a real file
        # (an in-memory database is private to one connection).
        "TEST": {"NAME": os.path.join(tmp, f"changefeed_sync-test-{pid}.sqlite3")},
        "OPTIONS": {"timeout": 30},
    }


def postgres_config() -> dict[str, Any]:
    p = ("CFS_PG_",)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": _env(p, "HOST", "127.0.0.1"),
        "PORT": _env(p, "PORT", "5432"),
        "USER": _env(p, "USER", "postgres"),
        "PASSWORD": _env(p, "PASSWORD", ""),
        "NAME": _env(p, "NAME", "test"),
        "TEST": {"NAME": _env(p, "TEST_NAME", _test_db_name())},
    }


def mariadb_config() -> dict[str, Any]:
    p = ("CFS_MARIADB_", "CFS_MYSQL_")
    return {
        "ENGINE": "django.db.backends.mysql",
        "HOST": _env(p, "HOST", "127.0.0.1"),
        "PORT": _env(p, "PORT", "3306"),
        "USER": _env(p, "USER", "root"),
        "PASSWORD": _env(p, "PASSWORD", ""),
        "NAME": _env(p, "NAME", "test"),
        "OPTIONS": {"charset": "utf8mb4", "isolation_level": "read committed"},
        "TEST": {
            "NAME": _env(p, "TEST_NAME", _test_db_name()),
            "CHARSET": "utf8mb4",
            "COLLATION": "utf8mb4_unicode_ci",
        },
    }


def build_databases(probe: bool | None = None) -> dict[str, dict[str, Any]]:
    """Return DATABASES with only the reachable servers; record the others."""
    if probe is None:
        probe = os.environ.get("CFS_DB_PROBE", "1").strip().lower() not in {"0", "false", "no"}

    SERVERS.clear()
    UNAVAILABLE.clear()
    ensure_mysql_driver()

    sqlite = sqlite_config()
    databases: dict[str, dict[str, Any]] = {"default": sqlite}
    SERVERS["default"] = ServerInfo(
        "default", f"SQLite file in {os.path.dirname(sqlite['TEST']['NAME'])}"
    )

    servers = (
        ("postgres", "PostgreSQL", postgres_config(), _probe_postgres),
        ("mariadb", "MariaDB", mariadb_config(), _probe_mariadb),
    )
    for alias, product, cfg, prober in servers:
        where = f"{cfg['HOST']}:{cfg['PORT']}"
        info = ServerInfo(alias, f"{product} at {where}")
        SERVERS[alias] = info
        if probe:
            error = _tcp_check(cfg["HOST"], int(cfg["PORT"]))
            version = ""
            if not error:
                error, version = prober(cfg)
            info.version = version
            if error:
                info.available = False
                info.reason = f"{product} not reachable at {where}: {error}"
                UNAVAILABLE[alias] = info.reason
                continue
        databases[alias] = cfg
    return databases


# --------------------------------------------------------------------------- test helpers


def require_alias(alias: str) -> None:
    """Skip the current test if ``alias`` was dropped (fail instead under CI)."""
    import pytest

    if alias in UNAVAILABLE:
        reason = UNAVAILABLE[alias]
        if in_ci():
            pytest.fail(f"{reason} (CI=true: a missing database server is an error)")
        pytest.skip(reason)
    if alias not in SERVERS:
        pytest.fail(f"unknown database alias {alias!r}; known: {', '.join(ALIASES)}")


def report_lines() -> list[str]:
    """Lines for pytest's report header."""
    lines = []
    for alias in ALIASES:
        info = SERVERS.get(alias)
        if info is None:
            continue
        label = f"{alias} ({LABELS[alias]})"
        if info.available:
            detail = f"{info.display}" + (f", {info.version}" if info.version else "")
            lines.append(f"  {label:22} used: {detail}")
        else:
            lines.append(f"  {label:22} SKIPPED: {info.reason}")
    return lines
