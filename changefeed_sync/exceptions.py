"""Every error changefeed_sync raises, in one place.

Errors about data carry the model label, the natural key and the field that
failed, so that a log line alone tells an operator what to fix.
"""

from __future__ import annotations

from typing import Any


class ChangefeedError(Exception):
    """Base class of all changefeed_sync errors."""


class RegistrationError(ChangefeedError):
    """A model was registered wrongly (registered twice, not a model, ...)."""


class ConfigurationError(ChangefeedError):
    """A setting or a Data Source is unusable."""


class ApplyError(ChangefeedError):
    """An event could not be applied on the target.

    Nothing of the batch that contained it was written and the checkpoint
    stays before it.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        key: Any = None,
        field: str | None = None,
        seq: int | None = None,
    ) -> None:
        self.model = model
        self.key = key
        self.field = field
        self.seq = seq
        parts = [message]
        if model is not None:
            parts.append(f"model={model}")
        if key is not None:
            parts.append(f"natural key={list(key)!r}")
        if field is not None:
            parts.append(f"field={field}")
        if seq is not None:
            parts.append(f"event seq={seq}")
        super().__init__(" ".join([parts[0] + ":", *parts[1:]]) if len(parts) > 1 else message)


class SourceError(ChangefeedError):
    """Talking to a source failed."""


class SourceUnavailable(SourceError):
    """The source could not be reached or answered 5xx; worth retrying."""


class AuthenticationFailed(SourceError):
    """The source refused our credentials (401/403); retrying will not help."""


class ProtocolError(SourceError):
    """The source answered something this version cannot understand."""


class FramingError(ProtocolError):
    """A page's positions or keys are inconsistent (framing.py); nothing of it was
    applied. Raised for feed pages and pushed batches alike; ``code`` is what the
    webhook answers with (422)."""

    def __init__(self, message: str, *, code: str = "bad_framing") -> None:
        self.code = code
        super().__init__(message)


class CursorExpired(SourceError):
    """The checkpoint is older than the oldest event the source still keeps."""


class FilterChanged(CursorExpired):
    """A filtered Target's feed holds events routed without its current row filters
    (set or changed since, or relayed unrouted): only a full Data Pull can say which
    rows it should have. Answered 410 ``filter_changed``."""


class CursorAhead(ChangefeedError):
    """Source side: a cursor beyond every position this outbox ever gave out."""

    def __init__(self, since: int, head: int) -> None:
        self.since = since
        self.head = head
        super().__init__(
            f"cursor {since} is beyond this source's last position {head}: the source was "
            "reset or replaced, or the target follows another site; run a full Data Pull"
        )


class SourceReset(SourceError):
    """Target side: the source is not the one the checkpoint belongs to (its identity
    changed, or it refused the checkpoint as beyond its last position). Only a full
    Data Pull goes on from here."""

    def __init__(self, source: str, detail: str) -> None:
        self.source = source
        self.detail = detail
        super().__init__(
            f"source was reset or replaced: run a full Data Pull (Data Source {source}: {detail})"
        )


class RowFiltersInvalid(ConfigurationError):
    """Source side: a Target's saved ``row_filters`` are not valid (saved past
    ``Target.clean()``, or a registration changed since: system check E011). Nothing is
    served to it rather than rows outside what was meant; ``problems`` lists what is
    wrong, as the admin and E011 say it."""

    def __init__(self, target: str, problems: list[str]) -> None:
        self.target = target
        self.problems = problems
        super().__init__(f"Target {target!r}: row_filters: " + " ".join(problems))


class SignatureError(ChangefeedError):
    """A request's credential is missing, malformed, wrong, expired or replayed.

    ``reason`` is for the server's log only; responses never reveal it.
    """

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        self.reason = reason
        self.missing = missing
        super().__init__(reason)


class PullRefused(ChangefeedError):
    """A full Data Pull would delete more than half of a model's rows on the target
    (the source looks empty); nothing was written. ``--allow-mass-delete`` or
    ``--keep-missing`` goes on."""


# ---------------------------------------------------------------- files


class FileTransferError(ChangefeedError):
    """A file could not be transferred as listed (too large, checksum mismatch); the
    message names the file. Raised by the target's downloads (a pull, an increment)."""


class ChecksumMismatch(FileTransferError):
    """The bytes received are not the ones listed (size or SHA-256 differ)."""


class BadFileToken(ChangefeedError):
    """Source side: a download request names no file this source listed (its token is
    forged, expired, another target's or of a model it does not receive); answered
    403, one answer for every reason, the reason logged."""


class FileOutsideFilter(ChangefeedError):
    """Source side: a download's token is good, but no row inside the requesting
    Target's row filters references the file now (its row left the filter, or names
    another file since); answered 404 ``file_outside_filter``, as a file gone is."""


class TransferDeadline(SourceUnavailable):
    """Downloading a batch's files took longer than the caller allows (a webhook, which
    answers 503 ``files_pending`` and keeps what it downloaded for the retry)."""


# ---------------------------------------------------------------- push


class DeliveryFailed(ChangefeedError):
    """Source side: a target did not acknowledge a pushed batch (no answer, or not
    2xx); the message names its webhook URL and the answer. Delivery records it on the
    Target row and tries again after a backoff."""

    def __init__(self, message: str, *, files_pending: bool = False) -> None:
        super().__init__(message)
        # The target ran out of time downloading the batch's files and keeps what it
        # has: sending the batch again at once lets it go on.
        self.files_pending = files_pending
