"""A standalone test site (tests/e2e_settings.py) that reports what its process did, for
tests/test_longpoll.py and bench/followers.py: ``GET /_longpoll/stats/`` answers the SQL
statements this process sent (those of the notifier's thread apart), the notifier's own
counters, the page cache's, the threads alive and the long-polls waiting under WSGI
(tests/longpoll_urls.py).

Statements are counted by a wrapper that every database connection of the process gets
when it opens (``connection_created``), whatever thread opens it: no statement escapes.

Environment: ``CFS_FEED_WSGI_WAITERS``, ``CFS_FEED_WSGI_RETRY_AFTER``,
``CFS_FEED_MAX_WAIT`` and ``CFS_CONN_MAX_AGE`` set the settings of those names;
``CFS_NO_MIDDLEWARE`` empties ``MIDDLEWARE``.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from django.apps import AppConfig

from tests.e2e_settings import *  # noqa: F403 - the standalone site
from tests.e2e_settings import DATABASES, INSTALLED_APPS

ROOT_URLCONF = "tests.longpoll_urls"
CHANGEFEED_SYNC_DELIVERY_BACKEND = None  # no pushes: followers read the feed
if os.environ.get("CFS_FEED_WSGI_WAITERS"):
    CHANGEFEED_SYNC_FEED_WSGI_WAITERS = int(os.environ["CFS_FEED_WSGI_WAITERS"])
if os.environ.get("CFS_FEED_WSGI_RETRY_AFTER"):
    CHANGEFEED_SYNC_FEED_WSGI_RETRY_AFTER = float(os.environ["CFS_FEED_WSGI_RETRY_AFTER"])
if os.environ.get("CFS_FEED_MAX_WAIT"):
    CHANGEFEED_SYNC_FEED_MAX_WAIT = float(os.environ["CFS_FEED_MAX_WAIT"])
if os.environ.get("CFS_NO_MIDDLEWARE"):
    MIDDLEWARE: list[str] = []
if os.environ.get("CFS_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["CFS_CONN_MAX_AGE"])

#: Statements sent, by kind of thread ("notifier" or "other").
STATEMENTS: Counter[str] = Counter()
_counting = threading.Lock()


def _count(execute: Callable[..., Any], sql: str, params: Any, many: bool,
           context: dict[str, Any]) -> Any:  # fmt: skip
    kind = (
        "notifier" if threading.current_thread().name.startswith("changefeed-notifier") else "other"
    )
    with _counting:
        STATEMENTS[kind] += 1
    return execute(sql, params, many, context)


def _on_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _count not in connection.execute_wrappers:  # a reconnecting wrapper keeps its list
        connection.execute_wrappers.append(_count)


class CountStatements(AppConfig):
    name = "tests"
    label = "cfs_longpoll_counting"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        connection_created.connect(_on_connection)


INSTALLED_APPS = [*INSTALLED_APPS, "tests.longpoll_settings.CountStatements"]
