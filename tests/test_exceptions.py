"""Every error lives in changefeed_sync/exceptions.py, derives from ChangefeedError
and can be imported from the package itself, which stays light to import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import changefeed_sync
from changefeed_sync import exceptions


def _classes() -> list[type[BaseException]]:
    return [
        value
        for value in vars(exceptions).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == exceptions.__name__
    ]


def test_every_error_is_a_changefeed_error_exported_by_the_package() -> None:
    classes = _classes()
    names = {cls.__name__ for cls in classes}
    # Those once defined next to their raisers (files, framing, pull, push) are here.
    moved = {"FileTransferError", "ChecksumMismatch", "BadFileToken", "TransferDeadline",
             "FramingError", "PullRefused", "DeliveryFailed"}  # fmt: skip
    assert moved <= names, moved - names
    for cls in classes:
        assert issubclass(cls, exceptions.ChangefeedError), cls
        assert cls.__doc__, cls
        assert cls.__name__ in changefeed_sync.__all__, cls
        assert getattr(changefeed_sync, cls.__name__) is cls


def test_errors_import_from_the_package() -> None:
    from changefeed_sync import ApplyError, DeliveryFailed, FramingError

    error = ApplyError("the database refused the row", model="testapp.country", key=["fr"])
    assert isinstance(error, changefeed_sync.ChangefeedError)
    assert error.model == "testapp.country"
    assert DeliveryFailed("HTTP 503", files_pending=True).files_pending
    assert FramingError("bad").code == "bad_framing"
    assert issubclass(FramingError, changefeed_sync.ProtocolError)
    assert issubclass(changefeed_sync.TransferDeadline, changefeed_sync.SourceUnavailable)


def test_importing_the_package_needs_no_configured_django() -> None:
    """``import changefeed_sync`` (for its errors, or to register models in another
    app's models.py) reads no setting (none are configured here: it would raise) and
    imports no model."""
    code = (
        "import sys; from changefeed_sync import ChangefeedError, register; "
        "assert 'changefeed_sync.models' not in sys.modules, 'models imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": ""}, timeout=60)
