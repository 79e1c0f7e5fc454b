"""The standalone test sites (tests/servers.py) served by an ASGI server (uvicorn), as
tests/test_longpoll.py and bench/followers.py serve them: ``application`` is Django's
handler for every URL; ``feed_application`` answers the feed itself
(changefeed_sync/asgi.py) and hands the rest to Django's."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from changefeed_sync.asgi import feed_application as answering_the_feed

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.e2e_settings")

application = get_asgi_application()
feed_application = answering_the_feed(application)

if os.environ.get("CFS_GC_FREEZE"):
    # As README "Deploying" suggests for a source with many followers: what Django's
    # start-up allocated is never scanned again by the garbage collector (its full
    # collections paused a worker for 70 to 100 ms every few seconds under load).
    import gc

    gc.collect()
    gc.freeze()
