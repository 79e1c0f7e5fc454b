"""Reading every registered row for a full Data Pull (source side, no HTTP here).

Rows are paged by primary key (keyset, never OFFSET), so each page costs the
same whatever the table size. The snapshot starts by recording the feed
position: every event up to it is committed (outbox.lock), so the rows read
afterwards reflect at least that state, and a target that continues the feed
from that position misses nothing. Events after it may already be in the
rows read; replaying them is harmless because applying is idempotent.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Max

from . import registry
from .apply import model_order
from .models import Event
from .serialization import PROTOCOL_VERSION, payloads_from_db


def start(using: str) -> dict[str, Any]:
    position = Event.objects.using(using).aggregate(m=Max("id"))["m"] or 0
    models = model_order(registry.get_registered_models())
    return {
        "protocol": PROTOCOL_VERSION,
        "position": position,
        "models": [m._meta.label_lower for m in models],
    }


def page(label: str, after: str | None, limit: int, using: str) -> dict[str, Any]:
    options = registry.options_for_label(label)
    if options is None:
        raise LookupError(f"model {label!r} is not registered with changefeed_sync here")
    pk_field = options.model._meta.pk
    assert pk_field is not None
    rows = options.model._base_manager.using(using).order_by("pk")
    if after not in (None, ""):
        rows = rows.filter(pk__gt=pk_field.to_python(after))
    pks = list(rows.values_list("pk", flat=True)[: limit + 1])
    more = len(pks) > limit
    pks = pks[:limit]
    payloads = payloads_from_db(options, pks, using)
    return {
        "protocol": PROTOCOL_VERSION,
        "model": label,
        "rows": [payloads[pk] for pk in pks if pk in payloads],
        "next": str(pks[-1]) if pks else (after or ""),
        "more": more,
    }
