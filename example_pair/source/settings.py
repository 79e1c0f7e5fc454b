"""Settings of the demo's source site: the site where content is edited.

It serves its change feed at /sync/ (urls.py) to the sites listed in its admin under
Changefeed sync -> Targets, and pushes each change to the Targets that have a webhook URL
(the default delivery backend, a thread of the process that made the change).
"""

from common_settings import *  # noqa: F403
from common_settings import VAR_DIR, database

DATABASES = {"default": database("source")}
MEDIA_ROOT = VAR_DIR / "source-media"
ROOT_URLCONF = "source.urls"

# Both sites run on 127.0.0.1 and browsers share cookies across ports: without names of
# their own, logging into one site's admin would log you out of the other's.
SESSION_COOKIE_NAME = "source_sessionid"
CSRF_COOKIE_NAME = "source_csrftoken"
