"""The standalone test sites (tests/servers.py) served by an ASGI server (uvicorn), as
tests/test_longpoll.py and bench/followers.py serve them: ``application`` is Django's
handler for every URL; ``feed_application`` answers the feed itself
(changefeed_sync/asgi.py) and hands the rest to Django's."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.e2e_settings")

application = get_asgi_application()

from changefeed_sync.asgi import feed_application as _feed_application  # noqa: E402 - after setup

feed_application = _feed_application(application)
