"""Files in a full Data Pull: contents of ``file_fields`` through Django's storage API.

The source is a separate process (tests.test_pull.SourceProcess) serving the PostgreSQL
test database with its own MEDIA_ROOT; the target is this process's SQLite database
with another MEDIA_ROOT. Both are FileSystemStorage, reached only through the storage
API. Requests the target makes are recorded with a response hook of the real
requests session it pulls with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core import signing
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, default_storage

from changefeed_sync.exceptions import FileTransferError, PullRefused
from changefeed_sync.models import DataPull, DataSource
from changefeed_sync.signing import sign_request
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.pull import execute, run_pull
from tests.helpers import state
from tests.test_pull import SourceProcess, documents, source_process  # noqa: F401 (fixtures)
from tests.testapp.models import Document, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(120),
]


class Site:
    """The source process, its storage, and a target pulling from it with a recording session."""

    def __init__(self, process: SourceProcess, tmp_path: Path) -> None:
        self.process = process
        self.source_media = tmp_path / "source-media"
        self.target_media = tmp_path / "target-media"
        self.storage = FileSystemStorage(location=self.source_media)
        self.ds = DataSource.objects.create(
            name="hq", url=process.url, client_name="t", secrets="pw"
        )
        self.session = requests.Session()
        self.paths: list[str] = []
        self.session.hooks["response"].append(self._record)

    def _record(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.paths.append(response.request.path_url)

    def file_requests(self) -> list[str]:
        return [p for p in self.paths if "/sync/files/" in p]

    def write(self, name: str, content: bytes) -> None:
        if self.storage.exists(name):
            self.storage.delete(name)
        assert self.storage.save(name, ContentFile(content)) == name

    def row(self, slug: str, name: str) -> Document:
        return Document.objects.using("postgres").create(slug=slug, attachment=name)

    def pull(self, **options: Any) -> dict[str, int]:
        self.paths.clear()
        _, counts = run_pull(
            self.ds, using="default", client=SourceClient(self.ds, self.session), **options
        )
        return counts["testapp.document"]

    def target_files(self) -> dict[str, bytes]:
        root = self.target_media
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }


@pytest.fixture
def site(source_process: SourceProcess, tmp_path: Path, settings: Any) -> Site:  # noqa: F811
    settings.MEDIA_ROOT = str(tmp_path / "target-media")  # default_storage follows it
    return Site(source_process, tmp_path)


def test_files_travel_under_their_names_only_when_they_differ(site: Site) -> None:
    big = os.urandom(300_000)
    site.write("docs/a.txt", b"hello")
    site.write("docs/big.bin", big)
    site.row("a", "docs/a.txt")
    site.row("none", "")
    site.row("big", "docs/big.bin")
    site.row("a-again", "docs/a.txt")  # two rows, one file

    counts = site.pull()
    assert counts["files_fetched"] == 2 and counts.get("files_missing", 0) == 0
    assert len(site.file_requests()) == 2  # none for the empty name, one per file
    assert site.target_files() == {"docs/a.txt": b"hello", "docs/big.bin": big}
    assert state("default") == state("postgres")

    counts = site.pull()
    assert site.file_requests() == []
    assert counts["files_unchanged"] == 3 and counts.get("files_fetched", 0) == 0

    site.write("docs/a.txt", b"hellO")  # same name, same size, new content
    counts = site.pull()
    assert counts["files_fetched"] == 1 and len(site.file_requests()) == 1
    # Overwritten in place: no renamed copy (img_0_s1XzJmr.png) next to it.
    assert site.target_files() == {"docs/a.txt": b"hellO", "docs/big.bin": big}
    assert default_storage.open("docs/a.txt").read() == b"hellO"


def test_dry_run_fetches_and_writes_no_file(site: Site) -> None:
    site.write("docs/a.txt", b"hello")
    site.row("a", "docs/a.txt")
    counts = site.pull(dry_run=True)
    assert counts["files_fetched"] == 1  # would be
    assert site.file_requests() == [] and site.target_files() == {}
    assert not Document.objects.exists()


def test_a_file_missing_on_the_source_is_reported_not_fatal(site: Site) -> None:
    site.write("docs/a.txt", b"hello")
    site.row("a", "docs/a.txt")
    site.row("gone", "docs/gone.txt")
    record = execute(DataPull.objects.create(source=site.ds))
    assert record.status == DataPull.SUCCEEDED, record.error
    assert record.counts["testapp.document"]["files_missing"] == 1
    assert record.counts["testapp.document"]["files_fetched"] == 1
    assert record.progress == (
        "done; 1 files missing on the source, e.g. testapp.document.attachment: docs/gone.txt"
    )
    assert Document.objects.get(slug="gone").attachment.name == "docs/gone.txt"
    assert site.target_files() == {"docs/a.txt": b"hello"}


def test_a_file_over_the_size_limit_fails_the_pull_and_writes_nothing(
    site: Site, settings: Any
) -> None:
    settings.CHANGEFEED_SYNC_MAX_FILE_SIZE = 100
    site.write("docs/small.txt", b"x" * 50)
    site.write("docs/large.txt", b"x" * 101)
    site.row("small", "docs/small.txt")
    site.row("large", "docs/large.txt")
    with pytest.raises(FileTransferError, match="CHANGEFEED_SYNC_MAX_FILE_SIZE"):
        site.pull()
    assert site.target_files() == {} and not Document.objects.exists()


def test_a_file_changed_during_the_pull_fails_the_checksum(site: Site) -> None:
    site.write("docs/a.txt", b"first")
    site.write("docs/b.txt", b"second")
    site.row("a", "docs/a.txt")
    site.row("b", "docs/b.txt")

    def change_b_once(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        # b was listed with a; it changes on the source once a is being downloaded.
        if "/sync/files/" in response.request.path_url and site.storage.exists("docs/b.txt"):
            if site.storage.open("docs/b.txt").read() == b"second":
                site.write("docs/b.txt", b"SECOND")

    site.session.hooks["response"].append(change_b_once)
    with pytest.raises(FileTransferError, match="does not match its listing"):
        site.pull()
    assert site.target_files() == {} and not Document.objects.exists()
    site.session.hooks["response"].remove(change_b_once)
    site.pull()
    assert site.target_files() == {"docs/a.txt": b"first", "docs/b.txt": b"SECOND"}


def test_a_pull_that_fails_after_downloading_leaves_the_storage_alone(site: Site) -> None:
    site.write("docs/a.txt", b"new a")
    site.write("docs/b.txt", b"new b")
    site.row("a", "docs/a.txt")
    site.row("b", "docs/b.txt")
    default_storage.save("docs/a.txt", ContentFile(b"old a"))
    Tag.objects.bulk_create([Tag(slug=f"t{i}") for i in range(3)])  # the source has none
    with pytest.raises(PullRefused):
        site.pull()
    assert len(site.file_requests()) == 2  # downloaded, then thrown away
    assert site.target_files() == {"docs/a.txt": b"old a"}


def test_files_written_before_a_failing_write_are_put_back(site: Site) -> None:
    """Publishing fails half-way (the target has a directory where the source has
    a file): the file written before it gets its old content back."""
    site.write("docs/a.txt", b"new a")
    site.write("docs/z", b"z is a file here")
    site.row("a", "docs/a.txt")
    site.row("z", "docs/z")
    default_storage.save("docs/a.txt", ContentFile(b"old a"))
    default_storage.save("docs/z/inside.txt", ContentFile(b"a directory there"))
    with pytest.raises(IsADirectoryError):
        site.pull()
    assert site.target_files() == {
        "docs/a.txt": b"old a",
        "docs/z/inside.txt": b"a directory there",
    }
    assert not Document.objects.exists()


def test_the_file_endpoint_wants_a_signed_request_and_a_listed_file(site: Site) -> None:
    site.write("docs/a.txt", b"hello")
    site.row("a", "docs/a.txt")
    base = site.process.url

    def get(path: str, signed: bool = True) -> requests.Response:
        headers = {"Authorization": sign_request("t", ["pw"], "GET", path)} if signed else {}
        return requests.get(base.removesuffix("/sync/") + path, headers=headers, timeout=10)

    page = get("/sync/snapshot/?model=testapp.document").json()
    meta = page["rows"][0]["files"]["attachment"]
    assert meta["name"] == "docs/a.txt" and meta["size"] == 5
    path = "/sync/files/?" + requests.compat.urlencode({"t": meta["token"]})
    assert get(path, signed=False).status_code == 401
    ok = get(path)
    assert ok.status_code == 200 and ok.content == b"hello"
    assert ok.headers["Content-Length"] == "5"
    forged = signing.dumps(
        {"m": "testapp.document", "f": "attachment", "n": "../settings.py"},
        key="not the source's key",
        salt="changefeed_sync.files.v1",
    )
    assert get("/sync/files/?" + requests.compat.urlencode({"t": forged})).status_code == 403
    site.storage.delete("docs/a.txt")
    gone = get(path)
    assert gone.status_code == 404 and gone.json()["code"] == "file_missing"
