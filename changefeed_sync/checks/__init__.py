"""System checks: registration and settings mistakes found at start-up, not at sync time.

Ids are stable; the README lists them. Importing this package registers them all
(``AppConfig.ready``): ``registration`` (the registered models), ``configuration``
(the settings and how the site is served), ``database`` (saved Targets).
"""

from __future__ import annotations

from .configuration import SETTING_CHECKS as SETTING_CHECKS
from .configuration import WSGI_WAITERS_WARN as WSGI_WAITERS_WARN
from .configuration import check_delivery as check_delivery
from .configuration import check_settings as check_settings
from .configuration import check_sqlite_transaction_mode as check_sqlite_transaction_mode
from .configuration import check_wsgi_long_polls as check_wsgi_long_polls
from .database import check_filtered_models_received as check_filtered_models_received
from .database import check_row_filters as check_row_filters
from .registration import check_registered_models as check_registered_models
from .registration import looks_secret as looks_secret
from .registration import name_words as name_words
