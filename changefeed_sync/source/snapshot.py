"""Serving a full Data Pull: the snapshot's start, its pages of rows, their digests.

Rows are paged by primary key (keyset, never OFFSET), so each page costs the
same whatever the table size. The snapshot starts by recording the feed
position: every event up to it is committed (sequencer.sequence), so the rows read
afterwards reflect at least that state, and a target that continues the feed
from that position misses nothing. Events after it may already be in the
rows read; replaying them is harmless because applying is idempotent.

Rows of models with ``file_fields`` also carry each named file's size,
SHA-256 and download token (file_serving.py), so a target fetches only what
differs. No HTTP here: views.py answers with what these functions return.
"""

from __future__ import annotations

from typing import Any

from .. import registry
from ..digests import DIGEST_VERSION, MAX_BUCKETS, DigestReader, decode_buckets
from ..keys import model_order
from ..registry import ModelOptions
from ..selection import Selection
from ..serialization import PROTOCOL_VERSION
from . import file_serving, sequencer

DIGEST_SECONDS = 2.0  # a digest request answers after about this long

# Pages and digests are built with the garbage collector running. Pausing it
# (rows.collection_paused) saved some CPU of serving a page (measured once, with a
# switch that was not kept), but it pauses every thread of the web process
# (long-polls, other requests): serving stays free of process-wide side effects.


def start(using: str, selection: Selection | None = None) -> dict[str, Any]:
    """The snapshot's feed position, this source's identity and the models to read,
    parents first, with their rows counted: every registered model and row, or those
    of ``selection`` (what a Target reads)."""
    selection = selection or Selection.everything()
    state = sequencer.state(using)
    # Every event committed before now has a position up to the head (the
    # sequencer gives positions only after commit), so the rows read after
    # this reflect at least that state. When every event was pruned, the head
    # is the last pruned one (0 would be expired).
    position = sequencer.head(using)
    ordered = model_order(selection.registered())
    # The rows the Target reads: a pull's progress, its choice between digests and
    # full pages, all measured against them.
    counts = {
        m._meta.label_lower: selection.rows(_options(m._meta.label_lower), using).count()
        for m in ordered
    }
    return {
        "protocol": PROTOCOL_VERSION,
        "source_id": state.source_id,
        "position": position,
        "models": [m._meta.label_lower for m in ordered],
        # For progress only: rows may come and go while the snapshot is read.
        "counts": counts,
        # This source answers digest requests (see ``digest``).
        "digests": DIGEST_VERSION,
    }


def _options(label: str) -> ModelOptions:
    options = registry.options_for_label(label)
    if options is None:
        raise LookupError(f"model {label!r} is not registered with changefeed_sync here")
    return options


def _check_buckets(options: ModelOptions, buckets: int) -> None:
    if not 1 <= buckets <= MAX_BUCKETS:
        raise ValueError(f"buckets must be between 1 and {MAX_BUCKETS}")
    if options.file_fields:
        raise ValueError(f"{options.label} has file fields: no digests, pull its rows")


def _reader(label: str, using: str, selection: Selection | None) -> DigestReader:
    """A reader of the rows of ``label`` that ``selection`` reads (LookupError: none)."""
    selection = selection or Selection.everything()
    if not selection.offers(label):
        raise LookupError(f"model {label!r} is not offered to this target")
    options = _options(label)
    return DigestReader(options, using, selection.rows_filter(options.label))


def digest(
    label: str,
    after: str | None,
    limit: int,
    buckets: int,
    using: str,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """Bucket digests of up to ``limit`` rows after ``after`` (the rows ``page`` would send)."""
    reader = _reader(label, using, selection)
    _check_buckets(reader.options, buckets)
    result = reader.digest_page(after, limit, buckets, seconds=DIGEST_SECONDS)
    return {
        "protocol": PROTOCOL_VERSION,
        "model": label,
        "buckets": buckets,
        "digests": result.to_wire(),
        "next": str(result.last) if result.last is not None else (after or ""),
        "more": result.more,
    }


def page(
    label: str,
    after: str | None,
    limit: int,
    using: str,
    buckets: int | None = None,
    only: str | None = None,
    *,
    target: str | None = None,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """Rows after ``after`` (of ``selection``: a Target's models and rows); with
    ``buckets`` and ``only``, just the rows of those buckets. File tokens of the rows
    work for ``target`` only, when given."""
    reader = _reader(label, using, selection)
    options = reader.options
    if buckets is None:
        rows, last, more = reader.page(after, limit)
    else:
        _check_buckets(options, buckets)
        wanted = decode_buckets(only or "", buckets)
        rows, last, more = reader.page_in_buckets(after, limit, buckets, wanted)
    if options.file_fields:
        file_serving.describe(options, rows, target)
    return {
        "protocol": PROTOCOL_VERSION,
        "model": label,
        "rows": rows,
        "next": str(last) if last is not None else (after or ""),
        "more": more,
    }
