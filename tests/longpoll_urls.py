"""URLs of the site of tests/longpoll_settings.py: the test site's, and what its process did."""

from __future__ import annotations

import os
import threading

from django.http import HttpRequest, JsonResponse
from django.urls import path

from changefeed_sync import conf
from changefeed_sync.source import longpoll, notifier, views
from tests import longpoll_settings
from tests.urls import urlpatterns as site_urlpatterns


def stats_view(request: HttpRequest) -> JsonResponse:
    """What this process did so far (no database query of its own)."""
    with longpoll_settings._counting:
        statements = dict(longpoll_settings.STATEMENTS)
    return JsonResponse({
        "pid": os.getpid(),
        "statements": statements,
        "notifier": notifier.stats(conf.feed_database()),
        "cache": longpoll.cache_stats(),
        "threads": threading.active_count(),
        "wsgi_waiting": views._WSGI_WAITS.taken,
        "wsgi_waiting_most": views._WSGI_WAITS.most,
    })  # fmt: skip


urlpatterns = [*site_urlpatterns, path("_longpoll/stats/", stats_view)]
