"""The standalone test sites (tests/servers.py) served by a WSGI server (gunicorn), as
tests/test_longpoll.py and bench/followers.py serve them."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.e2e_settings")

application = get_wsgi_application()
