"""Full Data Pull: make the target an exact copy of the source's registered rows.

All or nothing: the whole pull runs in one transaction on the target, so a
failure anywhere (source down, a row that cannot be applied, a killed
process) leaves the target as it was. Rows the source does not have are
deleted only after every page was read, and a pull that would delete more
than half of a model's rows stops unless explicitly allowed (an empty or
wrong source must not wipe the target). A dry run does all the work and
rolls it back, so its counts are exactly what a real pull would do.

Memory stays constant whatever the table size: pages are applied one at a
time (the next one is fetched while the current one is applied), and the
primary keys of the target rows the source has go into a temporary table
of the pull's transaction; the rows to delete are then found with an
anti-join, a chunk at a time. Files are staged on disk.

Speed: a page's rows are compared with the target's (a RowReader, one query
per page) and only new or changed rows are written, with one multi-row upsert
per chunk. A model whose rows are mostly here already is first compared by
bucket digests, and only the buckets that differ travel.

On a relay (a site with active targets of its own) the pull also writes, in
its transaction and page by page, an event per row it created, updated or
deleted, so that what it changed reaches the relay's targets through its feed.

The modules, in the order a pull goes through them: runner (a recorded pull,
its runner and heartbeat), run (the phases), pages (reading the source),
digests (comparing before reading), page (one page compared and written),
writer (one model's state and its writes), moves (unique values in the way),
seen (rows found, in a temporary table), deletes (rows the source lacks).
"""

from __future__ import annotations

from ...exceptions import PullRefused
from .deletes import MAX_DELETE_SHARE
from .progress import Progress, ProgressCallback
from .run import run_pull
from .runner import execute, fail_stale_pulls, stale_reason, start_in_background, this_runner

__all__ = [
    "MAX_DELETE_SHARE",
    "Progress",
    "ProgressCallback",
    "PullRefused",
    "execute",
    "fail_stale_pulls",
    "run_pull",
    "stale_reason",
    "start_in_background",
    "this_runner",
]
