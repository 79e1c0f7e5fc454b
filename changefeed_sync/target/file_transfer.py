"""Bringing the contents of ``file_fields`` from a source, through Django's storage API.

A file is downloaded only when the target's storage has no file of the same
name, size and SHA-256; rows with an empty name cost nothing. Downloads go to
a private staging directory, checked against the size limit and the checksum,
and are written to the storage under the source's exact name only at the very
end of the pull, inside its transaction: a pull that fails while reading
(source down, bad row, the mass-delete guard) never touches the storage. If
writing the files or the commit itself fails, files already written are put
back as they were (overwritten ones restored from a copy, new ones deleted).
Storages are not transactional, so a process killed during that last step can
leave new files behind; they are never referenced, and the next pull finds
them identical and keeps them.

The same machinery carries files in every increment (increment_files.py): the
target stages downloads the same way before the batch's transaction and
publishes them inside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.core.files import File
from django.core.files.storage import Storage
from django.core.files.utils import validate_file_name

from .. import conf, registry
from ..exceptions import (
    ChecksumMismatch,
    FileTransferError,
    SourceUnavailable,
    TransferDeadline,
)
from ..files import CHUNK_SIZE, digest, storage_of
from ..registry import ModelOptions
from ..signing import sign_request
from .client import SourceClient

logger = logging.getLogger("changefeed_sync.files")  # the name operators' logging knows

_SHA256 = re.compile(r"[0-9a-f]{64}")


class Stage:
    """Files of one pull: checked per page, downloaded to disk, published at the end.

    Everything lives on disk under a private directory (``new/<model>/<field>/<name>``
    for downloads, ``old/...`` for copies of overwritten files), so memory stays
    constant whatever the number of files; the walk order of ``new/`` is the
    publishing order, which is how ``undo`` knows what it published.
    """

    def __init__(
        self,
        client: SourceClient,
        *,
        dry_run: bool,
        keep: Path | None = None,
        deadline: float | None = None,
        prefix: str = "changefeed-pull-",
    ) -> None:
        self.client = client
        self.dry_run = dry_run
        # Verified downloads are also kept here by SHA-256 (hard links), so that an
        # attempt cut short by ``deadline`` (time.monotonic()) is not lost: the
        # next attempt takes them from here instead of downloading them again.
        self.keep = keep
        self.deadline = deadline
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=temp_dir()))
        self.published = 0
        self.missing_examples: list[str] = []
        self.kept_used: list[Path] = []

    # -------------------------------------------------------------- per page

    def check(
        self, options: ModelOptions, rows: Iterable[dict[str, Any]], counts: dict[str, int]
    ) -> None:
        """Download what differs from the target's copy; count fetched/unchanged/missing."""
        for row in rows:
            for field_name, meta in (row.get("files") or {}).items():
                if field_name not in options.file_fields or not isinstance(meta, dict):
                    continue
                name = str(meta.get("name") or "")
                if not name:
                    continue
                if meta.get("missing"):
                    self._missing(options, field_name, name, counts)
                    continue
                self._check_one(options, field_name, name, meta, counts)

    def _check_one(
        self,
        options: ModelOptions,
        field_name: str,
        name: str,
        meta: dict[str, Any],
        counts: dict[str, int],
    ) -> None:
        outcome = self.fetch(options, field_name, name, meta)
        if outcome == "unchanged":
            counts["files_unchanged"] = counts.get("files_unchanged", 0) + 1
        elif outcome == "fetched":
            counts["files_fetched"] = counts.get("files_fetched", 0) + 1
        elif outcome == "gone":
            self._missing(options, field_name, name, counts)

    def fetch(self, options: ModelOptions, field_name: str, name: str, meta: dict[str, Any]) -> str:
        """Stage one listed file unless the target's storage has it already.

        Returns ``"staged"`` (another row named it), ``"unchanged"`` (same name,
        size and SHA-256 here), ``"fetched"`` (downloaded and verified, or would be
        in a dry run) or ``"gone"`` (the source answered 404). Raises
        FileTransferError (too large), ChecksumMismatch, SourceUnavailable.
        """
        try:
            validate_file_name(name, allow_relative_path=True)
            size, sha = int(meta["size"]), str(meta["sha256"])
            if not _SHA256.fullmatch(sha) or size < 0:
                raise ValueError("size or sha256 malformed")
        except (SuspiciousFileOperation, KeyError, TypeError, ValueError) as exc:
            raise FileTransferError(
                f"{options.label}.{field_name}: source lists an unusable file {name!r} ({exc})"
            ) from None
        staged = self.root / "new" / options.label / field_name / name
        if staged.exists():  # another row names the same file
            return "staged"
        storage = storage_of(options, field_name)
        if _same_file(storage, name, size, sha):
            return "unchanged"
        limit = conf.max_file_size()
        if size > limit:
            raise FileTransferError(
                f"{options.label}.{field_name}: file {name!r} is {size} bytes, more than "
                f"CHANGEFEED_SYNC_MAX_FILE_SIZE ({limit}); raise the setting to transfer it"
            )
        if self.dry_run:
            return "fetched"
        staged.parent.mkdir(parents=True, exist_ok=True)
        if self.keep is not None and _take_kept(self.keep / sha, staged, size):
            self.kept_used.append(self.keep / sha)
            return "fetched"
        if not self._download(str(meta.get("token", "")), staged, name, size, sha, limit):
            return "gone"
        if self.keep is not None:
            _keep(staged, self.keep / sha)
            self.kept_used.append(self.keep / sha)
        return "fetched"

    def _missing(
        self, options: ModelOptions, field_name: str, name: str, counts: dict[str, int]
    ) -> None:
        counts["files_missing"] = counts.get("files_missing", 0) + 1
        where = f"{options.label}.{field_name}: {name}"
        if len(self.missing_examples) < 5:
            self.missing_examples.append(where)
        logger.warning("file missing on the source: %s", where)

    def _download(self, token: str, path: Path, name: str, size: int, sha: str, limit: int) -> bool:
        """Fetch one file to ``path``; False when the source no longer has it."""
        source = self.client.source
        base = source.url if source.url.endswith("/") else source.url + "/"
        url = urljoin(base, "files/") + "?" + urlencode({"t": token})
        parts = urlsplit(url)
        header = sign_request(
            source.client_name, source.secret_list(), "GET", f"{parts.path}?{parts.query}"
        )
        timeout = 60.0
        if self.deadline is not None:
            timeout = min(timeout, max(self.deadline - time.monotonic(), 0.1))
        try:
            response = self.client.session.get(
                url, headers={"Authorization": header}, stream=True, timeout=timeout
            )
        except requests.RequestException as exc:
            raise SourceUnavailable(f"source {source.name}: downloading {name!r}: {exc}") from exc
        with response:
            if response.status_code == 404:
                return False
            if response.status_code != 200:
                raise SourceUnavailable(
                    f"source {source.name} answered HTTP {response.status_code} for file {name!r}"
                )
            hasher = hashlib.sha256()
            received = 0
            try:
                # (A failed download leaves nothing staged under the file's name.)
                with _removed_on_error(path), open(path, "wb") as out:
                    for chunk in response.iter_content(CHUNK_SIZE):
                        if self.deadline is not None and time.monotonic() > self.deadline:
                            raise TransferDeadline(
                                f"source {source.name}: file {name!r} not downloaded in time"
                            )
                        received += len(chunk)
                        if received > limit:
                            raise FileTransferError(
                                f"file {name!r} from {source.name} is larger than "
                                f"CHANGEFEED_SYNC_MAX_FILE_SIZE ({limit})"
                            )
                        hasher.update(chunk)
                        out.write(chunk)
            except requests.RequestException as exc:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    raise TransferDeadline(
                        f"source {source.name}: file {name!r} not downloaded in time"
                    ) from exc
                raise SourceUnavailable(
                    f"source {source.name}: downloading {name!r}: {exc}"
                ) from exc
        if received != size or hasher.hexdigest() != sha:
            path.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"file {name!r} from {source.name} does not match its listing "
                f"({received} bytes, sha256 {hasher.hexdigest()}; listed {size} bytes, "
                f"sha256 {sha}); it may have changed during the pull: pull again"
            )
        return True

    # -------------------------------------------------------------- end of pull

    def _staged(self) -> Iterator[tuple[ModelOptions, str, str, Path]]:
        new = self.root / "new"
        if not new.is_dir():
            return
        for label in sorted(os.listdir(new)):
            options = registry.options_for_label(label)
            if options is None:
                continue
            for field_name in sorted(os.listdir(new / label)):
                base = new / label / field_name
                for dirpath, dirnames, filenames in os.walk(base):
                    dirnames.sort()
                    for filename in sorted(filenames):
                        path = Path(dirpath) / filename
                        yield options, field_name, path.relative_to(base).as_posix(), path

    def publish(self) -> None:
        """Write every downloaded file under its exact name (last step of the pull)."""
        for options, field_name, name, path in self._staged():
            storage = storage_of(options, field_name)
            if storage.exists(name):
                backup = self.root / "old" / options.label / field_name / name
                backup.parent.mkdir(parents=True, exist_ok=True)
                with storage.open(name, "rb") as current, open(backup, "wb") as out:
                    shutil.copyfileobj(current, out, CHUNK_SIZE)
                # Storage.save never overwrites: it would pick another name.
                storage.delete(name)
            self.published += 1
            with open(path, "rb") as handle:
                saved = storage.save(name, File(handle, name=name))
            if saved != name:
                storage.delete(saved)
                raise FileTransferError(
                    f"{options.label}.{field_name}: the storage saved {name!r} as {saved!r}; "
                    "file names must stay equal to the source's"
                )

    def undo(self) -> None:
        """Put back what ``publish`` wrote (the pull failed after or while publishing)."""
        done = 0
        for options, field_name, name, _ in self._staged():
            if done >= self.published:
                break
            done += 1
            storage = storage_of(options, field_name)
            try:
                if storage.exists(name):
                    storage.delete(name)
                backup = self.root / "old" / options.label / field_name / name
                if backup.exists():
                    with open(backup, "rb") as handle:
                        storage.save(name, File(handle, name=name))
            except Exception:
                logger.exception("could not restore file %s after a failed pull", name)
        self.published = 0

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _same_file(storage: Storage, name: str, size: int, sha: str) -> bool:
    try:
        if not storage.exists(name) or storage.size(name) != size:
            return False
        return digest(storage, name)[1] == sha
    except (FileNotFoundError, SuspiciousFileOperation):
        return False


@contextlib.contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _take_kept(kept: Path, staged: Path, size: int) -> bool:
    """Stage a download kept by an earlier attempt (named by its verified SHA-256)."""
    try:
        if kept.stat().st_size != size:
            return False
        os.link(kept, staged)
    except OSError:
        try:
            shutil.copyfile(kept, staged)
        except OSError:
            return False
    return True


def _keep(staged: Path, kept: Path) -> None:
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_name(f"{kept.name}.{uuid.uuid4().hex}.part")
        try:
            os.link(staged, partial)
        except OSError:
            shutil.copyfile(staged, partial)
        os.replace(partial, kept)
    except OSError:
        logger.warning("could not keep a downloaded file in %s", kept.parent, exc_info=True)


def temp_dir() -> str | None:
    """Where downloads are staged: Django's FILE_UPLOAD_TEMP_DIR (the disk set aside
    for uploads) when set, else the system's temporary directory."""
    return getattr(settings, "FILE_UPLOAD_TEMP_DIR", None) or None
