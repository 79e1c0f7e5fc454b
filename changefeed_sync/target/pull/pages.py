"""Reading the source's snapshot pages, the next one in flight while one is applied."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ...exceptions import ProtocolError
from ..client import SourceClient


def pages(
    client: SourceClient,
    labels: list[str],
    limit: int,
    extra: dict[str, dict[str, Any]] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every snapshot page of every model, in order; the next request is already in
    flight while the caller applies the current page (the source works meanwhile).
    ``extra``: more query parameters per model (the buckets of a digest comparison);
    ``meanwhile`` is called while the first page is being fetched."""

    def fetch(label: str, after: str) -> dict[str, Any]:
        params = {"model": label, "after": after, "limit": limit, **(extra or {}).get(label, {})}
        body = client.get_json("snapshot/", params, timeout=120)
        if not isinstance(body.get("rows"), list):
            raise ProtocolError(f"snapshot page of {label} has no rows")
        return body

    if not labels:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="changefeed-pull-fetch")
    try:
        index, after = 0, ""
        pending: Future[dict[str, Any]] | None = pool.submit(fetch, labels[0], after)
        if meanwhile is not None:
            meanwhile()
        while pending is not None:
            body = pending.result()
            label = labels[index]
            if body.get("more"):
                next_after = str(body.get("next", ""))
                if next_after == after:
                    raise ProtocolError(f"snapshot of {label} does not move past {after!r}")
                after = next_after
                pending = pool.submit(fetch, label, after)
            elif index + 1 < len(labels):
                index, after = index + 1, ""
                pending = pool.submit(fetch, labels[index], after)
            else:
                pending = None
            yield label, body
    finally:
        # A failed pull does not wait for a request still in flight.
        pool.shutdown(wait=False, cancel_futures=True)
