"""Target side of push: apply a delivered batch if it continues the checkpoint.

Cloud Tasks (and any webhook sender) delivers at least once and in no order:

- a batch that ends at or before the checkpoint was applied already: acknowledge it;
- a batch that starts at or before the checkpoint: apply the part after it;
- a batch that starts after the checkpoint (deliveries were lost or are
  late): catch up by pulling the feed from the checkpoint.

Each case converges to the source's state; the feed stays the source of truth.
"""

from __future__ import annotations

from typing import Any

from . import conf
from .apply import ApplyStats
from .client import SourceClient
from .exceptions import ProtocolError
from .follow import sync
from .increment_files import apply_with_files, kept_dir, references
from .models import DataSource
from .serialization import PROTOCOL_VERSION
from .signing import remember_nonce


def parse(body: Any) -> tuple[int, int, list[dict[str, Any]]]:
    if not isinstance(body, dict):
        raise ProtocolError("webhook body must be a JSON object")
    if body.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"webhook speaks protocol {body.get('protocol')!r}, this site speaks {PROTOCOL_VERSION}"
        )
    try:
        since, last_seq = int(body["since"]), int(body["last_seq"])
        events = list(body["events"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"webhook body lacks since/last_seq/events ({exc})") from exc
    if last_seq < since or any(not isinstance(e, dict) for e in events):
        raise ProtocolError("webhook body is inconsistent (last_seq < since or bad events)")
    return since, last_seq, events


def receive(
    source: DataSource,
    body: Any,
    *,
    using: str,
    nonce: str | None = None,
    deadline: float | None = None,
) -> tuple[str, ApplyStats | None]:
    """Apply a pushed batch; returns (outcome, stats). Outcome: duplicate, applied, caught_up.

    ``nonce`` (of the signed request) is recorded with what the batch writes,
    in one transaction: a request that failed can be retried identically.
    The files the batch references are downloaded from the Data Source's URL
    with its credentials before the batch's transaction (increment_files.py),
    until ``deadline`` (time.monotonic()); then files.TransferDeadline, and
    what was downloaded is kept for the retry.
    """
    since, last_seq, events = parse(body)
    for _ in range(3):  # another delivery may move the checkpoint between read and apply
        source.refresh_from_db(using=using, fields=["checkpoint"])
        checkpoint = source.checkpoint
        if last_seq <= checkpoint:
            return "duplicate", None
        if since > checkpoint:
            result = sync(source, using=using)
            if nonce is not None:
                remember_nonce(nonce, using, max_age=conf.webhook_tolerance())
            return "caught_up", result.stats
        fresh = [e for e in events if int(e.get("seq", 0)) > checkpoint]
        stats = apply_with_files(
            source,
            SourceClient(source),
            fresh,
            since=checkpoint,
            last_seq=last_seq,
            using=using,
            nonce=nonce,
            deadline=deadline,
            keep=kept_dir(source, using) if references(fresh) else None,
        )
        if stats is not None:
            return "applied", stats
    return "duplicate", None
