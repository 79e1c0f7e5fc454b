"""Moved: the snapshot's serving to source/snapshot.py, the row reading both sides
share to rows.py, digests to digests.py. The names other modules still import from here.
"""

# temporary: removed when the tree is reshaped

from __future__ import annotations

from .digests import DIGEST_VERSION as DIGEST_VERSION
from .digests import MAX_BUCKETS as MAX_BUCKETS
from .digests import DigestPage as DigestPage
from .digests import DigestReader as RowReader  # noqa: F401 (the pull reads digests with it)
from .digests import encode_buckets as encode_buckets
from .rows import _key_chunks as _key_chunks
from .rows import collection_paused as collection_paused
from .rows import plain_text as _plain_text  # noqa: F401
from .source.snapshot import digest as digest
from .source.snapshot import page as page
from .source.snapshot import start as start
