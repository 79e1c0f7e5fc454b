"""Compatibility with django-data-sync, whose models had to use its manager.

changefeed_sync needs no manager; ``DataSyncEnhancedManager`` is kept so that
models written for django-data-sync work after changing the import. It adds
``get_by_natural_key`` resolving the registered dotted natural key.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from . import registry
from .exceptions import RegistrationError


class DataSyncEnhancedManager(models.Manager[Any]):
    def get_by_natural_key(self, *values: Any) -> Any:
        options = registry.get_options(self.model)
        if options is None:
            raise RegistrationError(
                f"{self.model._meta.label} is not registered with changefeed_sync"
            )
        return self.get(**dict(zip(options.lookups, values, strict=True)))
