"""Settings of the demo's target site: it receives the source's changes.

Its admin lists the source under Changefeed sync -> Data sources; `manage.py
changefeed_pull source` copies everything once, `manage.py changefeed_sync source
--follow` keeps following the feed, and the source's pushes arrive at /sync/webhook/source/.
"""

from common_settings import *  # noqa: F403
from common_settings import VAR_DIR, database

DATABASES = {"default": database("target")}
MEDIA_ROOT = VAR_DIR / "target-media"
ROOT_URLCONF = "target.urls"

SESSION_COOKIE_NAME = "target_sessionid"  # see source/settings.py
CSRF_COOKIE_NAME = "target_csrftoken"

# A follower retries a source that went away with exponential backoff; in a demo where
# the source is restarted by hand, wait at most 5 s instead of the default 60 s.
CHANGEFEED_SYNC_RETRY_MAX_DELAY = 5.0
