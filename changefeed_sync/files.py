"""Stored files of ``file_fields`` as both sides see them, through Django's storage API.

The source serves them (source/file_serving.py: listing, tokens, downloads);
the target brings them (target/file_transfer.py for a full Data Pull,
target/increment_files.py for every increment). Both name a file by its
storage name and know it by its size and SHA-256, computed here.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import TYPE_CHECKING, Any

from django.core.files.storage import Storage

from .registry import ModelOptions

CHUNK_SIZE = 256 * 1024  # bytes read or written at a time: memory stays that of a chunk

#: The source's answers about one file of an increment (``POST files/``).
OK, SUPERSEDED, MISSING, REFUSED = "ok", "superseded", "missing", "refused"


def storage_of(options: ModelOptions, field_name: str) -> Storage:
    storage: Storage = options.model._meta.get_field(field_name).storage  # type: ignore[union-attr]
    return storage


def digest(storage: Storage, name: str) -> tuple[int, str]:
    """(size, SHA-256 hex) of a stored file, read in chunks."""
    sha = hashlib.sha256()
    size = 0
    with storage.open(name, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


# temporary: removed when the tree is reshaped. The names that moved to exceptions.py,
# source/ and target/, for the modules that still import them from here; those of
# source/ and target/ looked up on first use, because their modules import this one.
from .exceptions import BadFileToken as BadFileToken  # noqa: E402
from .exceptions import ChecksumMismatch as ChecksumMismatch  # noqa: E402
from .exceptions import FileTransferError as FileTransferError  # noqa: E402
from .exceptions import TransferDeadline as TransferDeadline  # noqa: E402

_MOVED = {
    "describe": "source.file_serving",
    "describe_current": "source.file_serving",
    "open_listed": "source.file_serving",
    "_token": "source.file_serving",
    "Stage": "target.file_transfer",
}

if TYPE_CHECKING:  # the real names, for mypy
    from .source.file_serving import _token as _token
    from .source.file_serving import describe as describe
    from .source.file_serving import describe_current as describe_current
    from .source.file_serving import open_listed as open_listed
    from .target.file_transfer import Stage as Stage


def __getattr__(name: str) -> Any:
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__package__}.{where}")
    return getattr(module, name)
