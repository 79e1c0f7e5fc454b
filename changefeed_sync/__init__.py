"""changefeed_sync: keep the data of one Django site in step with another.

Public API::

    import changefeed_sync

    @changefeed_sync.register_model(natural_key=["country.code", "code"])
    class Language(models.Model): ...

    changefeed_sync.register(SomeoneElsesModel, natural_key=["slug"])
    changefeed_sync.unregister(SomeoneElsesModel)

    with changefeed_sync.applying():   # writes here are not captured
        ...
"""

from __future__ import annotations

from .context import applying
from .registry import (
    get_registered_models,
    is_registered,
    register,
    register_model,
    unregister,
)

__all__ = [
    "applying",
    "get_registered_models",
    "is_registered",
    "register",
    "register_model",
    "unregister",
]

__version__ = "0.1.0"
