"""A ``snapshot/`` request's parameters, read and checked, answered by snapshot.py.

The view (views.snapshot_view) authenticates and turns what this raises into error
answers: LookupError for a model the Target does not read (404 ``unknown_model``),
ValueError or TypeError for a bad parameter (400 ``bad_parameter``).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import connections
from django.http import HttpRequest

from .. import conf
from ..http import int_param, shown
from ..registry import options_for_label
from ..selection import Selection
from ..sql import integer_range
from . import snapshot


def answer(request: HttpRequest, selection: Selection, target: str, using: str) -> dict[str, Any]:
    """Without ``model``: the snapshot's start (position, models, counts); with it, a
    page of rows (``after``, ``limit``; ``buckets`` and ``only`` for the rows of some
    buckets) or their bucket digests (``digest``), of the rows ``selection`` reads."""
    label = request.GET.get("model")
    if not label:
        return snapshot.start(using, selection)
    if not selection.offers(label):
        raise LookupError(label)
    after = request.GET.get("after")
    check_after(label, after, using)
    limit = max(int_param(request, "limit", 1000), 1)
    digest = int_param(request, "digest", 0)
    buckets = int_param(request, "buckets", 0)
    if digest:  # bucket digests: no rows, so many more rows per request
        limit = min(limit, 100 * conf.feed_max_limit())
        return snapshot.digest(label, after, limit, digest, using, selection)
    limit = min(limit, conf.feed_max_limit())
    only = request.GET.get("only") if buckets else None
    return snapshot.page(
        label, after, limit, using, buckets or None, only, target=target, selection=selection
    )


def check_after(label: str, after: str | None, using: str) -> None:
    """ValueError unless ``after`` is a primary key value of ``label``'s model (the
    ``next`` of a page): snapshot.py filters by it as it is."""
    if after in (None, ""):
        return
    options = options_for_label(label)
    if options is None:
        return  # snapshot.py answers 404 for the label
    pk = options.model._meta.pk
    assert pk is not None
    problem = f"'after' must be a primary key of {options.label}, got {shown(after)}"
    if "\x00" in after or len(after) > 1000:
        raise ValueError(problem)
    try:
        value = pk.to_python(after)
    except (ValidationError, ValueError, TypeError):
        raise ValueError(problem) from None
    internal = pk.get_internal_type()
    if isinstance(value, int) and internal.endswith(("IntegerField", "AutoField")):
        low, high = integer_range(connections[using], internal)
        if not low <= value <= high:
            raise ValueError(problem)
