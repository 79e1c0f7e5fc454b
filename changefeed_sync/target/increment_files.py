"""File contents of ``file_fields`` in every increment: feed pages and pushed batches.

An event carries a file field's *name*; this module brings the *content* with it,
in the same all-or-nothing unit as the row:

1. **Before the batch's transaction**, the target asks the source about every
   file an upsert of the batch references (``POST <prefix>/files/``, signed like
   every request). The source answers for the file its row of that model and
   natural key references *now* in that field: size, SHA-256 and a download token
   for this Target only (``ok``); ``superseded`` when the row is gone or references
   another name since (a later event carries that state, so the content of this
   name is skipped: the row gets the name now and the next event replaces it);
   ``missing`` when the row still references the name but the source's storage
   lacks it: an ApplyError naming model, key and field, and the batch is not applied.
2. Files whose name, size and SHA-256 the target's storage already has are not
   downloaded; the others are downloaded (``GET files/?t=``) into a private
   staging directory, checked against ``CHANGEFEED_SYNC_MAX_FILE_SIZE`` and the
   checksum. A file that changed or went away between the answer and the download
   is asked about once more; a second mismatch is an error.
3. **Inside the transaction** (apply_page's ``before_checkpoint``, after the rows,
   before the checkpoint moves) the staged files are written through the storage
   API under the source's exact names. If anything after that fails (the checkpoint,
   the commit), the files written are put back as they were (file_transfer.Stage.undo).

Why fetch outside the transaction: the page's transaction holds the outbox lock
and the Data Source's row (on SQLite the database's only write lock); network
I/O of unbounded length inside it would stall every local writer and every other
delivery. Only local work (writing staged files to the storage) happens inside.

A cleared file field clears the row's name; the file itself stays in the target's
storage, as Django leaves it when a field is cleared.

Webhooks must answer before the sender gives up (inline and Django tasks:
``CHANGEFEED_SYNC_DELIVERY_TIMEOUT``, 30 s; Cloud Tasks: the dispatch deadline).
A pushed batch's downloads therefore stop after ``CHANGEFEED_SYNC_WEBHOOK_FILES_SECONDS``
(20 s) with TransferDeadline (HTTP 503 ``files_pending``); what was downloaded
and verified by then is kept by SHA-256 for the retry, so every attempt makes
progress.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import conf
from ..exceptions import (
    ApplyError,
    ChecksumMismatch,
    FileTransferError,
    ProtocolError,
    SourceUnavailable,
    TransferDeadline,
)
from ..files import MISSING, OK, SUPERSEDED
from ..models import DataSource
from ..registry import ModelOptions, options_for_label
from ..serialization import PROTOCOL_VERSION
from .apply import ApplyStats, apply_page
from .client import SourceClient
from .file_transfer import Stage, temp_dir

logger = logging.getLogger("changefeed_sync.files")  # the name operators' logging knows

#: Files asked about per ``POST files/`` (the source accepts up to 1000).
DESCRIBE_CHUNK = 500
#: Downloads kept for a webhook's retry are dropped after this many seconds.
KEPT_MAX_AGE = 24 * 3600


@dataclass(frozen=True)
class FileRef:
    """A file an upsert event references: its row, field and name."""

    options: ModelOptions
    key: list[Any]
    field: str
    name: str
    seq: int

    def wire(self) -> dict[str, Any]:
        return {
            "model": self.options.label,
            "key": self.key,
            "field": self.field,
            "name": self.name,
        }

    def error(self, message: str) -> ApplyError:
        return ApplyError(
            message, model=self.options.label, key=self.key, field=self.field, seq=self.seq
        )


def references(events: Sequence[dict[str, Any]]) -> list[FileRef]:
    """Every (row, field, name) an upsert of ``events`` references, once each."""
    refs: list[FileRef] = []
    seen: set[tuple[str, str, str, str]] = set()
    for event in events:
        if event.get("op") != "upsert":
            continue
        options = options_for_label(str(event.get("model")))
        if options is None or not options.file_fields:
            continue  # an unknown model is apply's error to report
        data = event.get("data") or {}
        key = event.get("key")
        if not isinstance(key, list) or not isinstance(data, dict):
            continue
        for field in options.file_fields:
            name = data.get(field)
            if not isinstance(name, str) or not name:
                continue  # empty: a cleared field, nothing to fetch
            ident = (options.label, json.dumps(key), field, name)
            if ident not in seen:
                seen.add(ident)
                refs.append(FileRef(options, key, field, name, int(event.get("seq", 0))))
    return refs


@dataclass
class FileCounts:
    fetched: int = 0
    unchanged: int = 0
    superseded: int = 0


class IncrementFiles:
    """The files one batch needs: described and staged before its transaction,
    written inside it (``publish``), put back if it fails (``undo``)."""

    def __init__(
        self, client: SourceClient, *, deadline: float | None = None, keep: Path | None = None
    ) -> None:
        self.client = client
        self.deadline = deadline
        self.stage = Stage(
            client, dry_run=False, keep=keep, deadline=deadline, prefix="changefeed-increment-"
        )
        self.counts = FileCounts()

    # ------------------------------------------------------------ before the transaction

    def prepare(self, refs: Sequence[FileRef]) -> None:
        for start in range(0, len(refs), DESCRIBE_CHUNK):
            self._check_deadline()
            chunk = refs[start : start + DESCRIBE_CHUNK]
            for ref, answer in zip(chunk, self._describe(chunk), strict=True):
                self._check_deadline()
                self._fetch(ref, answer)

    def _describe(self, refs: Sequence[FileRef]) -> list[dict[str, Any]]:
        timeout = conf.request_timeout()
        if self.deadline is not None:
            timeout = min(timeout, max(self.deadline - time.monotonic(), 0.1))
        try:
            body = self.client.post_json(
                "files/",
                {"protocol": PROTOCOL_VERSION, "files": [ref.wire() for ref in refs]},
                timeout=timeout,
            )
        except SourceUnavailable:
            self._check_deadline()  # out of time rather than the source away
            raise
        answers = body.get("files")
        if (
            not isinstance(answers, list)
            or len(answers) != len(refs)
            or not all(isinstance(a, dict) for a in answers)
        ):
            raise ProtocolError(
                f"source {self.client.source.name}: malformed answer about {len(refs)} files"
            )
        return answers

    def _fetch(self, ref: FileRef, answer: dict[str, Any]) -> None:
        for attempt in (1, 2):
            status = answer.get("status")
            if status == SUPERSEDED:
                # The row is gone or references another file since: a later event
                # carries that state (and its file). Nothing to fetch for this name.
                self.counts.superseded += 1
                logger.info(
                    "%s %s %s: %r superseded on the source; a later event follows",
                    ref.options.label, ref.key, ref.field, ref.name,
                )  # fmt: skip
                return
            if status == MISSING:
                raise ref.error(
                    f"file {ref.name!r} is missing on the source (its row references it, "
                    "its storage lacks it)"
                )
            if status != OK:
                raise ref.error(f"the source does not serve file {ref.name!r} ({status})")
            try:
                outcome = self.stage.fetch(ref.options, ref.field, ref.name, answer)
            except ChecksumMismatch as exc:
                if attempt == 2:
                    raise ref.error(str(exc)) from exc
                outcome = "changed"
            except FileTransferError as exc:
                raise ref.error(str(exc)) from exc
            if outcome == "fetched":
                self.counts.fetched += 1
                return
            if outcome in ("unchanged", "staged"):
                self.counts.unchanged += outcome == "unchanged"
                return
            # Gone or changed since it was described: ask once more.
            if attempt == 2:
                raise ref.error(f"file {ref.name!r} is missing on the source")
            answer = self._describe([ref])[0]

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TransferDeadline(
                f"source {self.client.source.name}: the batch's files were not all "
                "downloaded in time"
            )

    # ------------------------------------------------------------ inside the transaction

    def publish(self, using: str) -> None:
        """apply_page's ``before_checkpoint``: write the staged files to the storages."""
        self.stage.publish()

    # ------------------------------------------------------------ after

    def undo(self) -> None:
        self.stage.undo()

    def done(self) -> None:
        """The batch committed: kept downloads are no longer needed."""
        for path in self.stage.kept_used:
            path.unlink(missing_ok=True)

    def cleanup(self) -> None:
        self.stage.cleanup()


def apply_with_files(
    source: DataSource,
    client: SourceClient,
    events: Sequence[dict[str, Any]],
    *,
    since: int,
    last_seq: int,
    using: str,
    nonce: str | None = None,
    deadline: float | None = None,
    keep: Path | None = None,
) -> ApplyStats | None:
    """apply_page, with the contents of the files ``events`` reference.

    Files are fetched first, with no transaction open; they are written inside
    the page's transaction; if that transaction fails they are put back.
    """
    refs = references(events)
    if not refs:
        return apply_page(source, events, since=since, last_seq=last_seq, using=using, nonce=nonce)
    files = IncrementFiles(client, deadline=deadline, keep=keep)
    try:
        files.prepare(refs)
        stats = apply_page(
            source,
            events,
            since=since,
            last_seq=last_seq,
            using=using,
            nonce=nonce,
            before_checkpoint=files.publish,
        )
    except BaseException:
        files.undo()
        raise
    else:
        files.done()
    finally:
        files.cleanup()
    if files.counts.fetched:
        logger.info(
            "source %s: %d files fetched, %d unchanged, %d superseded",
            source.name, files.counts.fetched, files.counts.unchanged, files.counts.superseded,
        )  # fmt: skip
    return stats


def kept_dir(source: DataSource, using: str) -> Path:
    """Where a webhook keeps verified downloads for its retries (per Data Source);
    entries older than a day are dropped on the way."""
    root = Path(temp_dir() or tempfile.gettempdir()) / "changefeed-sync-kept"
    path = root / f"{using}-{source.pk}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    cutoff = time.time() - KEPT_MAX_AGE
    for entry in path.iterdir():
        try:
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
        except OSError:
            pass
    return path
