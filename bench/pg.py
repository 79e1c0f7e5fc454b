"""The PostgreSQL server the benchmarks use (``CFS_PG_HOST`` / ``CFS_PG_PORT`` /
``CFS_PG_USER`` / ``CFS_PG_PASSWORD``, ``CFS_BENCH_PG=0`` to leave it out), shared by
bench/settings.py, bench/run.py and bench/pull.py."""

from __future__ import annotations

import os


def server() -> dict[str, str]:
    """Connection parameters of the server (not of a database on it), as DATABASES keys."""
    return {
        "HOST": os.environ.get("CFS_PG_HOST") or "127.0.0.1",
        "PORT": os.environ.get("CFS_PG_PORT") or "5432",
        "USER": os.environ.get("CFS_PG_USER") or "postgres",
        "PASSWORD": os.environ.get("CFS_PG_PASSWORD") or "",
    }


def admin(sql: str, *, connect_timeout: int = 5) -> None:
    """Run one statement on the server's ``postgres`` database, in autocommit
    (CREATE / DROP DATABASE)."""
    import psycopg

    params = server()
    with psycopg.connect(
        host=params["HOST"],
        port=int(params["PORT"]),
        user=params["USER"],
        password=params["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
        connect_timeout=connect_timeout,
    ) as conn:
        conn.execute(sql)


def unavailable() -> str:
    """ "" when the server is to be used and accepts a login, else why not."""
    if os.environ.get("CFS_BENCH_PG", "1").strip().lower() in {"0", "false", "no"}:
        return "disabled by CFS_BENCH_PG=0"
    try:
        admin("SELECT 1", connect_timeout=3)
    except Exception as exc:  # any failure means "not usable"
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return ""
