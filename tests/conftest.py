"""Suite-wide pytest configuration: database servers, their fixtures and the CI rules.

* ``db_alias`` -- parametrized over the "default" (SQLite), "postgres" and "mariadb"
  aliases (ids ``sqlite``/``postgres``/``mariadb``);
* ``backend_pair`` -- parametrized over (source_alias, target_alias) pairs;
* :func:`tests.dbs.require_alias` -- skip (or fail under CI) when an alias is missing.

A server that didn't answer when the settings were imported is dropped from DATABASES
(so ``databases="__all__"`` covers the reachable ones) and tests that need it are skipped
with the reason, which ``-ra`` prints in the summary. With ``CI=true`` a missing server
stops the run with a non-zero exit status instead: CI must not skip for a missing service.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from tests import dbs
from tests.dbs import require_alias

__all__ = ["require_alias"]


def _load_settings() -> None:
    """Import the Django settings (which probes the servers), if not done yet."""
    from django.conf import settings

    settings.DATABASES  # noqa: B018 - attribute access triggers the settings import


def pytest_configure(config: pytest.Config) -> None:
    _load_settings()
    if dbs.in_ci() and dbs.UNAVAILABLE:
        reasons = "\n".join(f"  - {alias}: {why}" for alias, why in dbs.UNAVAILABLE.items())
        pytest.exit(
            "CI=true but database servers are missing; nothing may be skipped for a "
            f"missing service under CI:\n{reasons}\n"
            "Start them (see .ci/run) or unset CI to skip those tests locally.",
            returncode=3,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    # The non-test SQLite file is only created if something connects outside the test
    # database; remove it so /tmp doesn't fill with one file per run.
    name = dbs.sqlite_config()["NAME"]
    try:
        os.remove(name)
    except OSError:
        pass


def pytest_report_header(config: pytest.Config) -> list[str]:
    _load_settings()
    mode = "CI=true: missing servers are errors" if dbs.in_ci() else "missing servers are skipped"
    return [f"database servers ({mode}):", *dbs.report_lines()]


def _requested_aliases(item: pytest.Item) -> Iterable[str]:
    """Aliases a test needs by name (not "__all__", which adapts to what's there)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        params: dict[str, Any] = callspec.params
        if isinstance(params.get("db_alias"), str):
            yield params["db_alias"]
        pair = params.get("backend_pair")
        if isinstance(pair, tuple):
            yield from pair
    marker = item.get_closest_marker("django_db")
    if marker is not None:
        databases = marker.kwargs.get("databases")
        if databases is None and len(marker.args) > 2:
            databases = marker.args[2]
        if databases is not None and databases != "__all__":
            yield from databases
    cls = getattr(item, "cls", None)
    cls_databases = getattr(cls, "databases", None) if cls is not None else None
    if cls_databases is not None and cls_databases != "__all__":
        try:
            yield from (a for a in cls_databases if isinstance(a, str))
        except TypeError:
            pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, before any fixture runs, tests that name a database server that's missing.

    (Otherwise pytest-django's autouse database fixture would error out on the unknown
    alias before ``db_alias``/``backend_pair`` had a chance to skip.)
    """
    if not dbs.UNAVAILABLE:
        return
    for item in items:
        for alias in _requested_aliases(item):
            if alias in dbs.UNAVAILABLE:
                item.add_marker(pytest.mark.skip(reason=dbs.UNAVAILABLE[alias]))
                break


@pytest.fixture(params=list(dbs.ALIASES), ids=[dbs.LABELS[a] for a in dbs.ALIASES])
def db_alias(request: pytest.FixtureRequest) -> str:
    """A database alias: "default" (SQLite), "postgres" or "mariadb"."""
    alias: str = request.param
    require_alias(alias)
    return alias


@pytest.fixture(
    params=list(dbs.BACKEND_PAIRS),
    ids=[f"{dbs.LABELS[s]}-{dbs.LABELS[t]}" for s, t in dbs.BACKEND_PAIRS],
)
def backend_pair(request: pytest.FixtureRequest) -> tuple[str, str]:
    """A (source_alias, target_alias) pair of different backends."""
    source, target = request.param
    require_alias(source)
    require_alias(target)
    return source, target


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Unregister whatever a test registered, even when it fails half-way."""
    from changefeed_sync import registry, unregister

    before = set(registry.get_registered_models())
    yield
    for model in set(registry.get_registered_models()) - before:
        unregister(model)
