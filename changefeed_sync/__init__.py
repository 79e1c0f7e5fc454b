"""changefeed_sync: keep the data of one Django site in step with another.

Public API::

    import changefeed_sync

    @changefeed_sync.register_model(natural_key=["country.code", "code"])
    class Language(models.Model): ...

    changefeed_sync.register(SomeoneElsesModel, natural_key=["slug"])
    changefeed_sync.unregister(SomeoneElsesModel)

    with changefeed_sync.applying():   # writes here are not captured
        ...

Every error it raises is a ``changefeed_sync.ChangefeedError`` (exceptions.py),
importable from here.
"""

from __future__ import annotations

from .context import applying
from .exceptions import (
    ApplyError,
    AuthenticationFailed,
    BadFileToken,
    ChangefeedError,
    ChecksumMismatch,
    ConfigurationError,
    CursorAhead,
    CursorExpired,
    DeliveryFailed,
    FileOutsideFilter,
    FileTransferError,
    FilterChanged,
    FramingError,
    ProtocolError,
    PullRefused,
    RegistrationError,
    RowFiltersInvalid,
    SignatureError,
    SourceError,
    SourceReset,
    SourceUnavailable,
    TransferDeadline,
)
from .registry import (
    get_registered_models,
    is_registered,
    register,
    register_model,
    unregister,
)

__all__ = [
    "ApplyError",
    "AuthenticationFailed",
    "BadFileToken",
    "ChangefeedError",
    "ChecksumMismatch",
    "ConfigurationError",
    "CursorAhead",
    "CursorExpired",
    "FilterChanged",
    "DeliveryFailed",
    "FileOutsideFilter",
    "FileTransferError",
    "FramingError",
    "ProtocolError",
    "PullRefused",
    "RegistrationError",
    "RowFiltersInvalid",
    "SignatureError",
    "SourceError",
    "SourceReset",
    "SourceUnavailable",
    "TransferDeadline",
    "applying",
    "get_registered_models",
    "is_registered",
    "register",
    "register_model",
    "unregister",
]

__version__ = "0.1.0"
