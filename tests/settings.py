"""Django settings for the changefeed_sync test suite.

DATABASES holds only the servers that answered when these settings were imported; see
tests/dbs.py for the probing, the CFS_* environment variables and the CI rules.
"""

from __future__ import annotations

from tests import dbs
from tests.site_settings import *  # noqa: F403 - apps, middleware, templates

SECRET_KEY = "changefeed-sync-tests-not-a-secret"  # test value only
ALLOWED_HOSTS = ["*"]

# "default" (SQLite file) always; "postgres" and "mariadb" only when reachable.
DATABASES = dbs.build_databases()

