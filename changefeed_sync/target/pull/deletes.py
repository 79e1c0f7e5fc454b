"""Deleting the rows the source does not have, once every page was read.

A pull that would delete more than half of a model's rows stops unless
explicitly allowed: an empty or wrong source must not wipe the target.
"""

from __future__ import annotations

from collections.abc import Callable

from ... import outbox
from ...exceptions import PullRefused
from ...models import Event
from ...serialization import key_of_row
from .writer import ModelWriter

MAX_DELETE_SHARE = 0.5


def delete_missing(
    model: ModelWriter,
    using: str,
    counts: dict[str, int],
    allow: bool,
    report: Callable[[int], None],
) -> None:
    """Delete the model's rows the source does not have; ``report`` is told how many
    were deleted so far, a chunk at a time."""
    if model.was_empty:
        return  # every row it has now was written by this pull
    seen = model.seen
    if seen.scoped and not seen.scope_rows:
        return  # a digest comparison found every row the target has on the source
    label = seen.options.label
    missing = seen.missing_count()
    if not missing:
        return
    total = seen.total()
    if not allow and total and missing > MAX_DELETE_SHARE * total:
        raise PullRefused(
            f"the pull would delete {missing} of {total} rows of {label} "
            f"(more than {MAX_DELETE_SHARE:.0%}); if the source really is that empty, pull again "
            "with --allow-mass-delete (or the admin option), or use --keep-missing"
        )
    options = seen.options
    manager = options.model._base_manager.using(using)
    deleted = 0
    # Through the ORM, a chunk at a time: cascades and delete signals apply,
    # and no statement carries more than a chunk of ids.
    for chunk in seen.missing():
        if model.relay:
            # Targets delete by natural key: read the rows' keys while they are there.
            keys = manager.filter(pk__in=chunk).values_list(*options.lookups)
            outbox.write(
                using,
                [outbox.make_event(label, Event.DELETE, key_of_row(options, k)) for k in keys],
                locked=True,
            )
        manager.filter(pk__in=chunk).delete()
        deleted += len(chunk)
        report(deleted)
    counts["deleted"] += deleted
