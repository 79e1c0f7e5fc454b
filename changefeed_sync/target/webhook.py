"""Target side of push: apply a delivered batch if it continues the checkpoint.

Cloud Tasks (and any webhook sender) delivers at least once and in no order:

- a batch that ends at or before the checkpoint was applied already: acknowledge it;
- a batch that starts at or before the checkpoint: apply the part after it;
- a batch that starts after the checkpoint (deliveries were lost or are
  late): catch up by pulling the feed from the checkpoint.

Each case converges to the source's state; the feed stays the source of truth.
"""

from __future__ import annotations

import decimal
from typing import Any

from django.db import DataError, IntegrityError, connections

from .. import conf, sql
from ..exceptions import ApplyError, ProtocolError
from ..models import DataSource
from ..registry import options_for_label
from ..serialization import PROTOCOL_VERSION, decode_value
from ..signing import remember_nonce
from .apply import ApplyStats
from .client import SourceClient, source_id_of
from .follow import check_source_id, sync
from .framing import check_page
from .increment_files import apply_with_files, kept_dir, references


def parse(body: Any) -> tuple[int, int, list[dict[str, Any]]]:
    """(since, last_seq, events) of a webhook body: ProtocolError if it is malformed,
    exceptions.FramingError if its positions or keys are inconsistent (framing.py)."""
    if not isinstance(body, dict):
        raise ProtocolError("webhook body must be a JSON object")
    if body.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"webhook speaks protocol {body.get('protocol')!r:.40}, this site speaks {PROTOCOL_VERSION}"
        )
    since, last_seq, events = body.get("since"), body.get("last_seq"), body.get("events")
    if type(since) is not int or type(last_seq) is not int or not isinstance(events, list):
        raise ProtocolError("webhook body lacks since/last_seq (integers) or events (a list)")
    check_page(events, since=since, last_seq=last_seq)
    source_id_of(body, "webhook body")
    return since, last_seq, events


def explain(exc: BaseException, events: list[dict[str, Any]], using: str) -> ApplyError:
    """An error the target's database (or its driver) raised while applying ``events``
    that apply.py did not put in the domain's words: the first value a column of this
    site cannot store, named by model, key and field; else the error as it is."""
    connection = connections[using]
    for event in events:
        options = options_for_label(str(event.get("model")))
        data = event.get("data")
        if event.get("op") != "upsert" or options is None or not isinstance(data, dict):
            continue
        for f in options.plain_fields:
            problem = _unstorable(f, data.get(f.name), connection)
            if problem:
                return ApplyError(
                    problem, model=options.label, key=event.get("key"), field=f.name,
                    seq=event.get("seq"),
                )  # fmt: skip
    return ApplyError(f"the target's database refused the batch ({type(exc).__name__}: {exc})")


def _unstorable(f: Any, raw: Any, connection: Any) -> str | None:
    if raw is None:
        return None
    try:
        value = decode_value(f, raw)
    except Exception as exc:  # noqa: BLE001 - any reason the value cannot be read
        return f"bad value {raw!r:.60} ({exc})"
    internal = f.get_internal_type()
    if isinstance(value, int) and internal.endswith(("IntegerField", "AutoField")):
        low, high = sql.integer_range(connection, internal)
        if not low <= value <= high:
            return f"value {value} is out of the column's range [{low}, {high}]"
    if isinstance(value, str):
        limit = getattr(f, "max_length", None)
        if limit and len(value) > limit:
            return f"value is longer than the column's {limit} characters"
    if isinstance(value, decimal.Decimal) and getattr(f, "max_digits", None):
        if not value.is_finite():
            return f"value {value} is not a finite number"
        digits = value.as_tuple()
        whole = len(digits.digits) + int(digits.exponent)
        if whole > f.max_digits - f.decimal_places:
            return (
                f"value {value} has more than {f.max_digits - f.decimal_places} digits "
                "before the point"
            )
    return None


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
    until ``deadline`` (time.monotonic()); then exceptions.TransferDeadline, and
    what was downloaded is kept for the retry.

    A batch from a source whose identity (``source_id``) is not the one the
    checkpoint belongs to raises SourceReset before anything moves.
    """
    since, last_seq, events = parse(body)
    check_source_id(source, source_id_of(body, "webhook body"), using=using)
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
        fresh = [e for e in events if e["seq"] > checkpoint]
        try:
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
        except (DataError, IntegrityError, OverflowError, decimal.InvalidOperation) as exc:
            # What apply.py could not explain (e.g. SQLite's driver refusing an
            # integer beyond 64 bits): nothing was written; say which value.
            raise explain(exc, fresh, using) from exc
        except ApplyError as exc:
            if exc.field is not None or exc.seq is None:
                raise
            # "The database refused the row": name the field if a value is why.
            better = explain(exc, [e for e in fresh if e["seq"] == exc.seq], using)
            if better.field is None:
                raise
            raise better from exc
        if stats is not None:
            return "applied", stats
    return "duplicate", None
