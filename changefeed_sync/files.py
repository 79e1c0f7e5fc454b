"""Stored files of ``file_fields`` as both sides see them, through Django's storage API.

The source serves them (source/file_serving.py: listing, tokens, downloads);
the target brings them (target/file_transfer.py for a full Data Pull,
target/increment_files.py for every increment). Both name a file by its
storage name and know it by its size and SHA-256, computed here.
"""

from __future__ import annotations

import hashlib

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
