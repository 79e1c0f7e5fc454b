"""File contents in every increment: feed pages and pushed batches bring the files
their rows reference, through Django's storage API, in the same all-or-nothing unit.

Two kinds of tests, nothing mocked:

* The source is a separate server process (tests.test_pull.SourceProcess) serving the
  PostgreSQL test database with its own MEDIA_ROOT; the target is this process, on
  SQLite ("default") or MariaDB, with another MEDIA_ROOT, following the source with
  ``follow.sync`` over HTTP through a requests session that records every request.
  Both storages are FileSystemStorage in temporary directories.
* End to end (the bottom of this file): two sites of tests/servers.py, each its own
  ``runserver`` and database, the target running ``manage.py changefeed_sync`` and
  receiving inline pushes from the source.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, default_storage
from django.test import Client

from changefeed_sync.exceptions import ApplyError
from changefeed_sync.models import DataSource, Event, Target
from changefeed_sync.signing import sign_request
from changefeed_sync.source import feed, push
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.follow import sync
from changefeed_sync.target.increment_files import IncrementFiles
from tests.dbs import require_alias
from tests.servers import Site, free_port, wait_until
from tests.test_pull import SourceProcess, documents, source_process  # noqa: F401 (fixtures)
from tests.testapp.models import Document, Tag

# ================================================================ a source process


class Pair:
    """The source process and its storage; a target alias of this process following it."""

    def __init__(self, process: SourceProcess, tmp_path: Path, alias: str) -> None:
        self.process = process
        self.alias = alias
        self.source_media = tmp_path / "source-media"
        self.target_media = tmp_path / "target-media"
        self.storage = FileSystemStorage(location=self.source_media)
        self.ds = DataSource.objects.using(alias).create(
            name="hq", url=process.url, client_name="t", secrets="pw"
        )
        self.session = requests.Session()
        self.requests: list[tuple[str, str]] = []
        self.session.hooks["response"].append(self._record)

    def _record(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.requests.append((response.request.method or "", response.request.path_url))

    def downloads(self) -> list[str]:
        return [p for m, p in self.requests if m == "GET" and p.startswith("/sync/files/")]

    def describes(self) -> int:
        return sum(1 for m, p in self.requests if m == "POST" and p == "/sync/files/")

    # ----------------------------------------------------------- source side

    def write(self, name: str, content: bytes) -> None:
        if self.storage.exists(name):
            self.storage.delete(name)
        assert self.storage.save(name, ContentFile(content)) == name

    def doc(self, slug: str, name: str) -> Document:
        doc = Document.objects.using("postgres").filter(slug=slug).first()
        if doc is None:
            return Document.objects.using("postgres").create(slug=slug, attachment=name)
        doc.attachment = name  # type: ignore[assignment]
        doc.save(using="postgres")
        return doc

    def last_seq(self) -> int:
        from changefeed_sync.source import feed

        return feed.head("postgres")

    # ----------------------------------------------------------- target side

    def sync(self, limit: int | None = None) -> int:
        self.requests.clear()
        self.ds.refresh_from_db(using=self.alias)
        result = sync(
            self.ds, using=self.alias, limit=limit, client=SourceClient(self.ds, self.session)
        )
        return result.stats.events

    def checkpoint(self) -> int:
        self.ds.refresh_from_db(using=self.alias)
        return self.ds.checkpoint

    def rows(self) -> dict[str, str]:
        return dict(Document.objects.using(self.alias).values_list("slug", "attachment"))

    def target_files(self) -> dict[str, bytes]:
        root = self.target_media
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }


@pytest.fixture(params=["default", "mariadb"], ids=["sqlite", "mariadb"])
def pair(
    request: pytest.FixtureRequest,
    source_process: SourceProcess,  # noqa: F811
    tmp_path: Path,
    settings: Any,
) -> Pair:
    require_alias(request.param)
    settings.MEDIA_ROOT = str(tmp_path / "target-media")  # default_storage follows it
    return Pair(source_process, tmp_path, request.param)


@pytest.fixture
def sqlite_pair(source_process: SourceProcess, tmp_path: Path, settings: Any) -> Pair:  # noqa: F811
    settings.MEDIA_ROOT = str(tmp_path / "target-media")
    return Pair(source_process, tmp_path, "default")


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_new_changed_unchanged_and_cleared_files(pair: Pair) -> None:
    big = os.urandom(300_000)
    pair.write("docs/a.txt", b"hello")
    pair.write("docs/big.bin", big)
    pair.doc("a", "docs/a.txt")
    pair.doc("big", "docs/big.bin")
    pair.doc("none", "")
    pair.doc("a-again", "docs/a.txt")  # two rows, one file

    assert pair.sync() == 4
    assert pair.target_files() == {"docs/a.txt": b"hello", "docs/big.bin": big}
    assert len(pair.downloads()) == 2 and pair.describes() == 1
    assert pair.rows() == {
        "a": "docs/a.txt", "big": "docs/big.bin", "none": "", "a-again": "docs/a.txt"
    }  # fmt: skip

    # A changed file: a new name (what Django's storage does), then the same name
    # with new content (a storage that overwrites).
    pair.write("docs/a2.txt", b"second a")
    pair.doc("a", "docs/a2.txt")
    pair.write("docs/big.bin", big[::-1])
    pair.doc("big", "docs/big.bin")
    assert pair.sync() == 2
    assert len(pair.downloads()) == 2
    assert pair.target_files() == {
        "docs/a.txt": b"hello", "docs/a2.txt": b"second a", "docs/big.bin": big[::-1]
    }  # fmt: skip
    assert default_storage.open("docs/big.bin").read() == big[::-1]  # overwritten in place

    # Unchanged content never travels again, whatever else changes.
    Document.objects.using("postgres").filter(slug="a-again").update(slug="a-also")
    pair.doc("big", "docs/big.bin")
    assert pair.sync() == 2
    assert pair.downloads() == [] and pair.describes() == 1
    assert pair.rows()["a-also"] == "docs/a.txt"

    # A cleared field clears on the target; the file stays, as Django leaves it.
    pair.doc("a", "")
    assert pair.sync() == 1
    assert pair.requests and not any("/files/" in p for _, p in pair.requests)
    assert pair.rows()["a"] == ""
    assert pair.checkpoint() == pair.last_seq()


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_a_file_missing_on_the_source_stops_the_batch(pair: Pair) -> None:
    pair.write("docs/ok.txt", b"ok")
    pair.doc("ok", "docs/ok.txt")
    pair.doc("gone", "docs/gone.txt")  # no such file on the source
    with pytest.raises(ApplyError) as info:
        pair.sync()
    message = str(info.value)
    assert "missing on the source" in message
    assert "model=testapp.document" in message
    assert "natural key=['gone']" in message and "field=attachment" in message
    assert pair.checkpoint() == 0 and pair.rows() == {}
    assert pair.target_files() == {}
    pair.ds.refresh_from_db(using=pair.alias)
    assert "docs/gone.txt" in pair.ds.last_error

    # Stopped until the source is repaired: then it goes on by itself.
    pair.write("docs/gone.txt", b"found again")
    pair.sync()
    assert pair.target_files() == {"docs/ok.txt": b"ok", "docs/gone.txt": b"found again"}
    assert pair.checkpoint() == pair.last_seq()


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_a_file_changed_or_deleted_since_the_event_does_not_stop_the_sync(
    sqlite_pair: Pair,
) -> None:
    """The source answers "superseded": the name is applied without its content,
    the later event brings the newer file (or the delete)."""
    pair = sqlite_pair
    pair.write("docs/v1.txt", b"one")
    pair.doc("d", "docs/v1.txt")
    pair.write("docs/v2.txt", b"two")
    pair.doc("d", "docs/v2.txt")
    pair.storage.delete("docs/v1.txt")  # the source cleans up the old file
    pair.write("docs/e.txt", b"e")
    pair.doc("e", "docs/e.txt")
    Document.objects.using("postgres").filter(slug="e").delete()
    pair.storage.delete("docs/e.txt")

    pair.sync(limit=1)  # one event per page: each page is one state of the past
    assert pair.rows() == {"d": "docs/v2.txt"}
    assert pair.target_files() == {"docs/v2.txt": b"two"}
    assert pair.checkpoint() == pair.last_seq()


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_too_large_or_not_matching_its_checksum_is_an_error(
    sqlite_pair: Pair, settings: Any
) -> None:
    pair = sqlite_pair
    pair.write("docs/small.txt", b"x" * 50)
    pair.write("docs/large.txt", b"x" * 101)
    pair.doc("small", "docs/small.txt")
    pair.doc("large", "docs/large.txt")
    settings.CHANGEFEED_SYNC_MAX_FILE_SIZE = 100
    with pytest.raises(ApplyError, match="CHANGEFEED_SYNC_MAX_FILE_SIZE") as info:
        pair.sync()
    assert "natural key=['large']" in str(info.value) and "field=attachment" in str(info.value)
    assert pair.rows() == {} and pair.target_files() == {} and pair.checkpoint() == 0
    settings.CHANGEFEED_SYNC_MAX_FILE_SIZE = 1000

    def change_after_describe(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        # Every time the source has described the files, large.txt changes there:
        # the download never matches what was described.
        if response.request.method == "POST":
            pair.write("docs/large.txt", os.urandom(101))

    pair.session.hooks["response"].append(change_after_describe)
    with pytest.raises(ApplyError, match="does not match its listing") as info:
        pair.sync()
    assert "natural key=['large']" in str(info.value)
    assert pair.describes() == 2  # described again once, then given up
    assert pair.rows() == {} and pair.target_files() == {} and pair.checkpoint() == 0

    pair.session.hooks["response"].remove(change_after_describe)
    pair.sync()
    assert set(pair.target_files()) == {"docs/small.txt", "docs/large.txt"}


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_files_written_in_a_transaction_that_fails_are_put_back(pair: Pair) -> None:
    """Writing the files fails half-way inside the page's transaction (the target has
    a directory where the source has a file): the file written before it gets its old
    content back, and neither rows nor checkpoint move."""
    pair.write("docs/a.txt", b"new a")
    pair.write("docs/z", b"z is a file here")
    pair.doc("a", "docs/a.txt")
    pair.doc("z", "docs/z")
    default_storage.save("docs/a.txt", ContentFile(b"old a"))
    default_storage.save("docs/z/inside.txt", ContentFile(b"a directory there"))
    with pytest.raises(IsADirectoryError):
        pair.sync()
    assert pair.target_files() == {
        "docs/a.txt": b"old a",
        "docs/z/inside.txt": b"a directory there",
    }
    assert pair.rows() == {} and pair.checkpoint() == 0


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_a_commit_that_fails_after_the_files_were_written_puts_them_back(
    sqlite_pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = sqlite_pair
    pair.write("docs/a.txt", b"new a")
    pair.write("docs/b.txt", b"new b")
    pair.doc("a", "docs/a.txt")
    pair.doc("b", "docs/b.txt")
    default_storage.save("docs/a.txt", ContentFile(b"old a"))
    published = IncrementFiles.publish

    def publish_then_fail(self: IncrementFiles, using: str) -> None:
        published(self, using)
        assert default_storage.open("docs/b.txt").read() == b"new b"  # written...
        raise RuntimeError("the transaction fails after the files were written")

    monkeypatch.setattr(IncrementFiles, "publish", publish_then_fail)
    with pytest.raises(RuntimeError):
        pair.sync()
    assert pair.target_files() == {"docs/a.txt": b"old a"}  # ...and removed again
    assert pair.rows() == {} and pair.checkpoint() == 0


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_the_files_endpoint_describes_only_what_a_row_references(sqlite_pair: Pair) -> None:
    pair = sqlite_pair
    pair.write("docs/a.txt", b"hello")
    pair.write("docs/private.txt", b"not referenced by any row")
    pair.doc("a", "docs/a.txt")
    Target.objects.using("postgres").create(
        name="other", secrets="pw2", model_labels=["testapp.tag"]
    )
    base = pair.process.url.removesuffix("/sync/")

    def describe(items: list[dict[str, Any]], name: str = "t", secret: str = "pw") -> Any:
        body = json.dumps({"protocol": 1, "files": items}).encode()
        headers = {"Authorization": sign_request(name, [secret], "POST", "/sync/files/", body)}
        return requests.post(base + "/sync/files/", data=body, headers=headers, timeout=10)

    def get(token: str, name: str = "t", secret: str = "pw") -> requests.Response:
        path = "/sync/files/?" + requests.compat.urlencode({"t": token})
        headers = {"Authorization": sign_request(name, [secret], "GET", path)}
        return requests.get(base + path, headers=headers, timeout=10)

    item = {"model": "testapp.document", "key": ["a"], "field": "attachment"}
    answers = describe([
        {**item, "name": "docs/a.txt"},
        {**item, "name": "docs/private.txt"},  # a file this row does not reference
        {**item, "name": "../../etc/passwd"},
        {**item, "key": ["nope"], "name": "docs/a.txt"},
        {**item, "field": "slug", "name": "a"},  # not a file field
        {"model": "auth.user", "key": ["x"], "field": "x", "name": "docs/a.txt"},
    ]).json()["files"]  # fmt: skip
    assert answers[0]["status"] == "ok" and answers[0]["size"] == 5
    assert [a["status"] for a in answers[1:]] == [
        "superseded", "superseded", "superseded", "refused", "refused"
    ]  # fmt: skip
    assert get(answers[0]["token"]).content == b"hello"

    # Authenticated exactly like the feed; limited to the Target's models; a token
    # works for the Target it was issued to only.
    unsigned = requests.post(base + "/sync/files/", data=b"{}", timeout=10)
    assert unsigned.status_code == 401
    assert describe([{**item, "name": "docs/a.txt"}], secret="wrong").status_code == 403
    other = describe([{**item, "name": "docs/a.txt"}], name="other", secret="pw2").json()
    assert other["files"] == [{"status": "refused"}]
    assert get(answers[0]["token"], name="other", secret="pw2").status_code == 403

    pair.storage.delete("docs/a.txt")
    assert describe([{**item, "name": "docs/a.txt"}]).json()["files"] == [{"status": "missing"}]


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(120)
def test_a_webhook_out_of_time_for_its_files_answers_files_pending(
    sqlite_pair: Pair, settings: Any
) -> None:
    """A pushed batch's receiver fetches the files from the Data Source's URL before
    applying; when that takes longer than CHANGEFEED_SYNC_WEBHOOK_FILES_SECONDS it
    answers 503 files_pending in time (nothing applied) and a resend applies it."""
    pair = sqlite_pair
    pair.write("docs/a.txt", b"pushed")
    pair.doc("a", "docs/a.txt")
    events = feed.read(0, 100, using="postgres").events
    sender = Target(name="t", secrets="pw", webhook_url="http://testserver/sync/webhook/hq/")

    def deliver() -> Any:
        batch = push.Batch(sender, 0, events[-1]["seq"], push._body(sender, 0, events))
        headers = {
            f"HTTP_{k.upper().replace('-', '_')}": v for k, v in push.signed_headers(batch).items()
        }
        return Client().post(
            "/sync/webhook/hq/", batch.body, content_type="application/json", **headers
        )

    settings.CHANGEFEED_SYNC_WEBHOOK_FILES_SECONDS = 0
    late = deliver()
    assert late.status_code == 503 and late.json()["code"] == "files_pending"
    assert pair.rows() == {} and pair.target_files() == {} and pair.checkpoint() == 0

    settings.CHANGEFEED_SYNC_WEBHOOK_FILES_SECONDS = 20
    applied = deliver()
    assert applied.status_code == 200, applied.content
    assert applied.json()["status"] == "applied"
    assert pair.rows() == {"a": "docs/a.txt"} and pair.target_files() == {"docs/a.txt": b"pushed"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_a_batch_answered_files_pending_is_sent_again_at_once(settings: Any) -> None:
    """The sender's side: a target that answers 503 files_pending made progress
    (it keeps what it downloaded); the batch goes again at once, not after a backoff."""
    settings.CHANGEFEED_SYNC_DELIVERY_BACKEND = None
    answers = [503, 503, 200]
    received: list[bytes] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            status = answers[len(received) - 1]
            body = json.dumps({"code": "files_pending"} if status == 503 else {}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = Target.objects.create(
            name="t", secrets="pw", webhook_url=f"http://127.0.0.1:{server.server_port}/hook/"
        )
        Tag.objects.create(slug="x")
        assert push.deliver_pending(target.pk) is None
    finally:
        server.shutdown()
        server.server_close()
    assert len(received) == 3 and received[0] == received[2]
    target.refresh_from_db()
    assert target.failures == 0 and target.delivered_seq == Event.objects.get().position


# ================================================================ end to end

#: Registers Document with its file field on a site of tests/servers.py.
E2E_ENV = {"CFS_E2E_DOCUMENT_FILES": "1"}
SECRET = "files-secret"
E2E_PAIRS = [("sqlite", "mariadb"), ("mariadb", "postgres"), ("postgres", "sqlite")]


class FilesSite(Site):
    """A site of tests/servers.py with Document's file field registered and its own media."""

    @property
    def media(self) -> Path:
        return self.workdir / f"{self.role}-media"

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(E2E_ENV, CFS_E2E_MEDIA_ROOT=str(self.media))
        return env

    def files(self) -> dict[str, bytes]:
        return {
            p.relative_to(self.media).as_posix(): p.read_bytes()
            for p in sorted(self.media.rglob("*"))
            if p.is_file()
        }

    def rows(self) -> dict[str, str]:
        return dict(self.query("SELECT slug, attachment FROM testapp_document"))


WRITE = """
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from tests.testapp.models import Document, Tag
for name, content in {files!r}.items():
    if default_storage.exists(name):
        default_storage.delete(name)
    assert default_storage.save(name, ContentFile(content)) == name
for slug, name in {rows!r}.items():
    if name is None:
        Document.objects.filter(slug=slug).delete()
    else:
        Document.objects.update_or_create(slug=slug, defaults={{"attachment": name}})
"""


def write(site: Site, files: dict[str, bytes] | None = None, **rows: str | None) -> None:
    site.run_python(WRITE.format(files=files or {}, rows=rows))


@pytest.fixture(scope="module", params=E2E_PAIRS, ids=[f"{s}-{t}" for s, t in E2E_PAIRS])
def sites(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FilesSite, FilesSite]]:
    source_backend, target_backend = request.param
    aliases = {"sqlite": "default", "postgres": "postgres", "mariadb": "mariadb"}
    require_alias(aliases[source_backend])
    require_alias(aliases[target_backend])
    workdir = tmp_path_factory.mktemp(f"files-{source_backend}-{target_backend}")
    source = FilesSite("src", source_backend, workdir)
    target = FilesSite("tgt", target_backend, workdir)
    source.port, target.port = free_port(), free_port()
    try:
        for site in (source, target):
            site.media.mkdir()
            site.start_shell()
            site.create_database()
            site.migrate()
            site.start_server()
        source.run_python(f"""
            from changefeed_sync.models import Target
            Target.objects.create(name="tgt", secrets={SECRET!r})
        """)
        target.run_python(f"""
            from changefeed_sync.models import DataSource
            DataSource.objects.create(name="src", url={source.url + "sync/"!r},
                                      client_name="tgt", secrets={SECRET!r})
        """)
        yield source, target
    finally:
        for site in (source, target):
            site.close()


def downloads(source: Site) -> int:
    """Files the source's server sent (its request log)."""
    assert source.server is not None
    return len(re.findall(r'"GET /sync/files/\?t=\S+ HTTP/1.1" 200', source.server.stderr()))


def checkpoint(target: Site) -> int:
    return int(target.scalar("SELECT checkpoint FROM changefeed_sync_datasource"))


def last_seq(source: Site) -> int:
    return int(source.scalar("SELECT MAX(id) FROM changefeed_sync_event") or 0)


@pytest.mark.timeout(300)
def test_e2e_follow_then_push_carry_files(sites: tuple[FilesSite, FilesSite]) -> None:
    source, target = sites
    big = os.urandom(200_000)

    # ---- changefeed_sync (pulled by the target's command)
    write(source, {"docs/a.txt": b"hello", "docs/big.bin": big}, a="docs/a.txt", big="docs/big.bin")
    target.run_django("changefeed_sync", "src")
    assert target.files() == {"docs/a.txt": b"hello", "docs/big.bin": big}
    assert target.rows() == {"a": "docs/a.txt", "big": "docs/big.bin"}
    assert downloads(source) == 2

    write(source, {"docs/a.txt": b"hello again"}, a="docs/a.txt", big="docs/big.bin", c="")
    target.run_django("changefeed_sync", "src")
    assert target.files()["docs/a.txt"] == b"hello again"
    assert downloads(source) == 3  # big.bin was unchanged: not sent again

    write(source, gone="docs/gone.txt")  # the source lacks this file
    failed = target.run_django("changefeed_sync", "src", check=False)
    assert failed.returncode != 0
    assert re.search(
        r"missing on the source.*model=testapp.document natural key=\['gone'\] field=attachment",
        failed.stderr,
    ), failed.stderr
    assert "gone" not in target.rows() and checkpoint(target) < last_seq(source)
    write(source, {"docs/gone.txt": b"back"})
    target.run_django("changefeed_sync", "src")
    assert target.files()["docs/gone.txt"] == b"back"
    assert checkpoint(target) == last_seq(source)

    # ---- inline push: the source's writer delivers after commit, the target's
    # webhook fetches the files from the source before applying.
    source.run_python(f"""
        from changefeed_sync.source import push
        from changefeed_sync.models import Target
        Target.objects.filter(name="tgt").update(
            webhook_url={target.url + "sync/webhook/src/"!r}, delivered_seq={last_seq(source)})
        # This shell's writes above cached "no target takes pushes" for a second: a
        # write within it would not be pushed (README, Limitations).
        push.forget_targets()
    """)
    write(source, {"docs/p.txt": b"pushed"}, p="docs/p.txt", a="")
    wait_until(lambda: checkpoint(target) == last_seq(source), timeout=30, what="the push")
    assert target.rows()["p"] == "docs/p.txt" and target.rows()["a"] == ""
    assert target.files()["docs/p.txt"] == b"pushed"
    assert downloads(source) == 5

    before = downloads(source)
    write(source, {"docs/p.txt": b"pushed, changed"}, p="docs/p.txt", big="docs/big.bin")
    wait_until(lambda: checkpoint(target) == last_seq(source), timeout=30, what="the push")
    assert target.files()["docs/p.txt"] == b"pushed, changed"
    assert target.files()["docs/big.bin"] == big
    assert downloads(source) == before + 1

    write(source, p=None)  # deleted: the file stays, the row goes
    wait_until(lambda: checkpoint(target) == last_seq(source), timeout=30, what="the push")
    assert "p" not in target.rows()
