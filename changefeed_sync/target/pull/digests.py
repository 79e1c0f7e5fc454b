"""Comparing a model's rows with the source's by bucket digests before a re-pull:
only the rows of the buckets that differ travel, and only the rows here in those
buckets can be missing on the source."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from ... import conf
from ...digests import MAX_BUCKETS, DigestPage, encode_buckets
from ...exceptions import ProtocolError
from ...rows import collection_paused
from ..client import SourceClient
from .writer import ModelWriter

ROWS_PER_BUCKET = 8
# Rows per digest request, as a multiple of the page size (digests are small; the
# source also answers after snapshot.DIGEST_SECONDS).
_DIGEST_PAGES = 100


def _source_digests(client: SourceClient, label: str, buckets: int, limit: int) -> DigestPage:
    """The source's bucket digests of every row of ``label``, summed over its pages."""
    total = DigestPage(buckets)
    after = ""
    while True:
        body = client.get_json(
            "snapshot/",
            {"model": label, "after": after, "limit": limit, "digest": buckets},
            timeout=120,
        )
        try:
            if body.get("buckets") != buckets:
                raise ValueError(f"asked for {buckets} buckets, got {body.get('buckets')!r}")
            total.merge(body["digests"])
            more, next_after = bool(body["more"]), str(body["next"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"snapshot digests of {label}: malformed page ({exc})") from exc
        if not more:
            return total
        if next_after == after:
            raise ProtocolError(f"snapshot digests of {label} do not move past {after!r}")
        after = next_after


class SourceDigests:
    """The source's digests of the models compared by digests, asked for in order by
    two threads from the start of the pull (a small model's answer does not wait for a
    big one's): the source computes them while this site computes its own and applies
    the other models."""

    def __init__(self, client: SourceClient, buckets: dict[str, int]) -> None:
        self.buckets = buckets
        self.pool: ThreadPoolExecutor | None = None
        self.futures: dict[str, Future[DigestPage]] = {}
        if buckets:
            limit = _DIGEST_PAGES * conf.pull_page_size()
            self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="changefeed-digests")
            for label, n in buckets.items():
                self.futures[label] = self.pool.submit(_source_digests, client, label, n, limit)

    def close(self) -> None:
        if self.pool is not None:
            # A failed pull does not wait for a request still in flight.
            self.pool.shutdown(wait=False, cancel_futures=True)


def digest_buckets(model: ModelWriter, source_rows: int) -> int | None:
    """How many buckets to compare the model's rows in; None when every row is to be
    pulled (the table here is empty or holds less than a quarter of the source's
    rows, or the model has files: their contents are checked row by row)."""
    if model.was_empty or model.options.file_fields:
        return None
    target_rows = model.seen.total()
    if target_rows * 4 < source_rows:
        return None
    return min(MAX_BUCKETS, max(1, -(-max(source_rows, target_rows) // ROWS_PER_BUCKET)))


def compare_digests(
    model: ModelWriter, buckets: int, theirs: Future[DigestPage], counts: dict[str, int]
) -> int | None:
    """Compare the model's rows here with the source's digests (this site's computed
    now, after the models before it were applied); set ``model.only`` to the buckets
    that differ and count the rows of the others as unchanged. Return those rows'
    number, or None when too many buckets differ: then every row is pulled."""
    with collection_paused():
        mine = model.reader.digest_all(buckets)
    source = theirs.result()
    differ = source.differing(mine)
    if len(differ) * 4 > buckets:
        return None  # asking for a quarter of the buckets costs about all the rows
    unchanged = sum(source.counts) - sum(source.counts[b] for b in differ)
    counts["unchanged"] += unchanged
    model.seen.limit_to([])  # nothing can be missing but rows of the buckets that differ
    if differ:
        model.differ = (buckets, frozenset(differ))
        model.only = {"buckets": buckets, "only": encode_buckets(differ, buckets)}
    return unchanged


def scope_deletes(model: ModelWriter) -> None:
    """Put this site's rows of the buckets that differ in the deletes' scope: the only
    rows that can be missing on the source."""
    buckets, wanted = model.differ
    with collection_paused():
        for pks in model.reader.pks_in_buckets(buckets, wanted):
            model.seen.limit_to(pks)
