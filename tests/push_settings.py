"""Settings of a standalone site (tests/e2e_settings.py) plus the ones a test hands it.

``CFS_EXTRA_SETTINGS`` holds a JSON object of settings, e.g.
``{"CHANGEFEED_SYNC_DELIVERY_EXIT_WAIT": 1}``: tests of processes that exit right after a
write (tests/test_push_exit.py) set the delivery backend and its settings this way, as
a project's settings module would.
"""

from __future__ import annotations

import json
import os

from tests.e2e_settings import *  # noqa: F403 - the site's databases, apps, logging

globals().update(json.loads(os.environ.get("CFS_EXTRA_SETTINGS") or "{}"))
