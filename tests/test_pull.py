"""Full Data Pull over HTTP: real sources (a live server thread, or a server process
with its own media directory), real target databases, nothing mocked.

``SourceProcess`` serves one of the test databases from a separate Python process
(tests.e2e_settings pointed at that database), so that a test can pull into another
alias of this process, into the admin's "default" database, or from a source it
kills; tests/test_pull_files.py uses it too.
"""

from __future__ import annotations

import datetime
import decimal
import io
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connections, models
from django.test import Client
from django.urls import reverse
from django.utils import timezone

import changefeed_sync
from changefeed_sync import registry
from changefeed_sync.exceptions import SourceUnavailable
from changefeed_sync.models import DataPull, DataSource, Event, Target
from changefeed_sync.rows import RowReader
from changefeed_sync.serialization import payloads_from_db
from changefeed_sync.target.follow import sync
from changefeed_sync.target.pull import (
    Progress,
    PullRefused,
    execute,
    fail_stale_pulls,
    run_pull,
    start_in_background,
    this_runner,
)
from tests.dbs import require_alias
from tests.helpers import state
from tests.testapp.models import Category, Copy, Country, Document, Kinds, Language, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(180),
]

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- sources


def database_url(alias: str) -> str:
    """The URL tests.e2e_settings takes, for the test database behind ``alias``."""
    cfg = connections[alias].settings_dict
    if cfg["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{cfg['NAME']}"
    scheme = "postgres" if cfg["ENGINE"].endswith("postgresql") else "mysql"
    auth = quote(cfg["USER"], safe="")
    if cfg["PASSWORD"]:
        auth += ":" + quote(cfg["PASSWORD"], safe="")
    return f"{scheme}://{auth}@{cfg['HOST']}:{cfg['PORT']}/{cfg['NAME']}"


_SERVE = """
import os, sys
import django
django.setup()
from django.test.utils import override_settings
override_settings(MEDIA_ROOT=os.environ["CFS_MEDIA_ROOT"]).enable()
import changefeed_sync
from tests.testapp.models import Document
changefeed_sync.register(Document, natural_key=["slug"], file_fields=["attachment"])
from django.core.handlers.wsgi import WSGIHandler
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

class Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass

server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
server.set_app(WSGIHandler())
sys.stdout.write(f"{server.server_port}\\n")
sys.stdout.flush()
server.serve_forever()
"""


class SourceProcess:
    """A source site in its own process: the test database of ``alias``, files in
    ``media_root``, the testapp models plus Document (with its file field)."""

    def __init__(self, alias: str, media_root: Path, log: Path) -> None:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.e2e_settings",
            "CFS_DATABASE_URL": database_url(alias),
            "CFS_MEDIA_ROOT": str(media_root),
            "PYTHONUNBUFFERED": "1",
        }
        self.log = log
        self._stderr = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        line = self.process.stdout.readline() if ready else b""
        if not line.strip():
            self.stop()
            raise AssertionError(f"source process did not start:\n{log.read_text()}")
        self.url = f"http://127.0.0.1:{int(line)}/sync/"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


@pytest.fixture
def documents() -> Iterator[None]:
    """Document registered here as in every SourceProcess."""
    changefeed_sync.register(Document, natural_key=["slug"], file_fields=["attachment"])
    yield
    changefeed_sync.unregister(Document)


@pytest.fixture
def source_process(tmp_path: Path, documents: None) -> Iterator[SourceProcess]:
    """A source process serving the PostgreSQL test database."""
    require_alias("postgres")
    (tmp_path / "source-media").mkdir()
    process = SourceProcess("postgres", tmp_path / "source-media", tmp_path / "source.log")
    Target.objects.using("postgres").create(name="t", secrets="pw")
    yield process
    process.stop()


@pytest.fixture(params=["postgres", "mariadb"])
def tgt(request: pytest.FixtureRequest) -> str:
    require_alias(request.param)
    return str(request.param)


@pytest.fixture
def source(live_server, tgt: str) -> DataSource:  # type: ignore[no-untyped-def]
    """The live server (this process, SQLite "default") as the source of ``tgt``."""
    Target.objects.create(name="t", secrets="pw")
    return DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="t", secrets="pw"
    )


def _seed(countries: int = 3, keys: int = 5, using: str = "default") -> None:
    red = Tag.objects.using(using).create(slug="red")
    root = Category.objects.using(using).create(slug="root")
    Category.objects.using(using).create(slug="kid", parent=root)
    for c in range(countries):
        country = Country.objects.using(using).create(code=f"c{c}")
        lang = Language.objects.using(using).create(country=country, code="xx")
        for k in range(keys):
            copy = Copy.objects.using(using).create(language=lang, key=f"k{k}", value=str(k))
            if k % 2:
                copy.tags.add(red)


# --------------------------------------------------------------------------- the pull


def test_pull_copies_then_feed_continues(source: DataSource, tgt: str) -> None:
    _seed()
    position, counts = run_pull(source, using=tgt)
    assert state(tgt) == state("default")
    assert position == Event.objects.order_by("-position").first().position  # type: ignore[union-attr]
    assert counts["testapp.copy"]["created"] == 15
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == position
    # Changes after the snapshot arrive through the feed, nothing skipped.
    Copy.objects.filter(key="k1").update(value="after")
    Country.objects.create(code="zz")
    sync(source, using=tgt)
    assert state(tgt) == state("default")


def test_repull_counts_unchanged_and_deletes_missing(source: DataSource, tgt: str) -> None:
    _seed()
    run_pull(source, using=tgt)
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.copy"] == {"created": 0, "updated": 0, "deleted": 0, "unchanged": 15}
    Copy.objects.filter(key="k4").delete()
    Copy.objects.filter(key="k0").update(value="new")
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.copy"] == {"created": 0, "updated": 3, "deleted": 3, "unchanged": 9}
    assert state(tgt) == state("default")


def test_small_pages_and_cascading_deletes(source: DataSource, tgt: str, settings: Any) -> None:
    """Many pages per model; deleting a parent the source lacks cascades through the ORM."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 4
    _seed(countries=3, keys=7)
    run_pull(source, using=tgt)
    Country.objects.filter(code="c1").delete()  # its language and copies go with it
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.country"]["deleted"] == 1
    assert counts["testapp.language"]["deleted"] == 1
    assert counts["testapp.copy"]["deleted"] == 7
    assert counts["testapp.copy"]["unchanged"] == 14
    assert state(tgt) == state("default")


def test_every_field_type_round_trips_and_compares_unchanged(source: DataSource, tgt: str) -> None:
    tz = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    Kinds.objects.create(
        slug="all", big=2**62 + 1, dec=decimal.Decimal("123456.123456"),
        when=datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=tz),
        day=datetime.date(1999, 12, 31), uid=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        blob=b"\x00\xffbinary", doc={"a": [1, 2, {"b": None}], "c": "\u00e9"}, flag=True,
        ratio=0.1, span=datetime.timedelta(days=2, microseconds=7), color="blue",
    )  # fmt: skip
    Kinds.objects.create(slug="empty")
    run_pull(source, using=tgt)
    for slug in ("all", "empty"):
        a, b = Kinds.objects.get(slug=slug), Kinds.objects.using(tgt).get(slug=slug)
        for f in Kinds._meta.concrete_fields:
            va, vb = getattr(a, f.attname), getattr(b, f.attname)
            if isinstance(va, memoryview | bytes):
                va, vb = bytes(va), bytes(vb)
            assert f.primary_key or va == vb, f.name
    # What the target reads back compares equal to what the source sends.
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.kinds"] == {"created": 0, "updated": 0, "deleted": 0, "unchanged": 2}


class PullBin(models.Model):
    """An integer natural key."""

    number = models.IntegerField(unique=True)
    label = models.CharField(max_length=20, default="")

    class Meta:
        app_label = "testapp"


class PullPart(models.Model):
    """A natural key through a foreign key to a non-primary-key column, and a
    nullable foreign key outside the key."""

    bin = models.ForeignKey(PullBin, to_field="number", on_delete=models.CASCADE)
    serial = models.IntegerField()
    spare = models.ForeignKey(PullBin, null=True, on_delete=models.SET_NULL, related_name="spares")
    weight = models.DecimalField(max_digits=8, decimal_places=3, default=0)

    class Meta:
        app_label = "testapp"
        unique_together = [("bin", "serial")]


@pytest.fixture
def parts() -> Iterator[None]:
    changefeed_sync.register(PullBin, natural_key=["number"])
    changefeed_sync.register(PullPart, natural_key=["bin.number", "serial"])
    yield
    changefeed_sync.unregister(PullPart)
    changefeed_sync.unregister(PullBin)


def test_integer_keys_and_keys_through_a_to_field(
    parts: None, source: DataSource, tgt: str, settings: Any
) -> None:
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 3
    bins = [PullBin.objects.create(number=n * 7, label=f"bin {n}") for n in range(4)]
    for i in range(10):
        PullPart.objects.create(
            bin=bins[i % 4], serial=i, spare=bins[(i + 1) % 4] if i % 3 else None,
            weight=decimal.Decimal(i) / 8,
        )  # fmt: skip
    run_pull(source, using=tgt)
    assert state(tgt) == state("default")
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.pullpart"]["unchanged"] == 10
    PullPart.objects.filter(serial=4).update(weight=decimal.Decimal("9.5"))
    PullPart.objects.filter(serial=5).delete()
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.pullpart"] == {"created": 0, "updated": 1, "deleted": 1, "unchanged": 8}
    assert state(tgt) == state("default")


def test_snapshot_rows_are_the_feed_payloads(parts: None) -> None:
    """The snapshot's join-free reader gives exactly serialization.payloads_from_db's
    payloads (the feed's), for every registered model of the test app."""
    _seed()
    Kinds.objects.create(slug="k", big=2**60, dec=decimal.Decimal("1.5"), doc={"x": [1]})
    Category.objects.create(slug="orphan")
    bins = [PullBin.objects.create(number=n) for n in range(3)]
    PullPart.objects.create(bin=bins[0], serial=1, spare=bins[2])
    PullPart.objects.create(bin=bins[1], serial=1)
    for options in registry.all_options():
        pks = list(options.model._base_manager.order_by("pk").values_list("pk", flat=True))
        expected = payloads_from_db(options, pks, "default")
        rows, last, more = RowReader(options, "default").page(None, 1000)
        assert rows == [expected[pk] for pk in pks], options.label
        assert (last, more) == ((pks[-1] if pks else None), False)
        keys = [tuple(r["key"]) for r in rows]
        found = RowReader(options, "default").by_keys(keys)
        assert {k: data for k, (_, data) in found.items()} == {
            tuple(p["key"]): p["data"] for p in expected.values()
        }, options.label


def test_key_chunks_stay_under_the_parameter_limit_and_avoid_cross_products() -> None:
    from changefeed_sync.rows import _key_chunks

    single = {(f"k{i}",) for i in range(5000)}
    chunks = list(_key_chunks(single, 1, 999))
    assert all(len(c) <= 999 for c in chunks) and set().union(*map(set, chunks)) == single
    # Unrelated two-part keys: IN (a..) x IN (b..) must not match a cross product.
    pairs = {(f"a{i}", f"b{i}") for i in range(300)}
    for chunk in _key_chunks(pairs, 2, 999):
        assert len({k[0] for k in chunk}) * len({k[1] for k in chunk}) <= 2 * len(chunk) + 16
    # A full grid is one chunk.
    grid = {(f"c{i}", f"l{j}", f"k{k}") for i in range(10) for j in range(5) for k in range(40)}
    assert [len(c) for c in _key_chunks(grid, 3, 999)] == [2000]


def test_rows_pointing_at_rows_read_later(source: DataSource, tgt: str, settings: Any) -> None:
    """Self-references to later pages and a cycle: written null, then set by a second pass."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 2
    kids = [Category.objects.create(slug=f"kid{i}") for i in range(5)]
    root = Category.objects.create(slug="root")  # the highest primary key: the last page
    Category.objects.filter(pk__in=[k.pk for k in kids]).update(parent=root)
    a, b = Category.objects.create(slug="a"), Category.objects.create(slug="b")
    Category.objects.filter(pk=a.pk).update(parent=b)
    Category.objects.filter(pk=b.pk).update(parent=a)
    seen: list[Progress] = []
    _, counts = run_pull(source, using=tgt, progress=seen.append)
    assert state(tgt) == state("default")
    assert counts["testapp.category"]["created"] == 8
    assert any(p.phase == "relink" for p in seen)
    _, counts = run_pull(source, using=tgt)
    assert counts["testapp.category"]["unchanged"] == 8


def test_deleting_more_rows_than_any_bind_parameter_limit(
    source_process: SourceProcess,
) -> None:
    """33,000 target rows the source lacks, on SQLite (32,766 bind parameters at most):
    found by anti-join against the pull's temporary table, deleted a chunk at a time."""
    Tag.objects.using("postgres").create(slug="kept")
    with changefeed_sync.applying():
        Tag.objects.bulk_create([Tag(slug=f"extra-{i}") for i in range(33_000)], batch_size=5000)
    ds = DataSource.objects.create(name="p", url=source_process.url, client_name="t", secrets="pw")
    with pytest.raises(PullRefused, match="33000 of 33001 rows of testapp.tag"):
        run_pull(ds, using="default")
    assert Tag.objects.count() == 33_000
    _, counts = run_pull(ds, using="default", allow_mass_delete=True)
    assert counts["testapp.tag"] == {"created": 1, "updated": 0, "deleted": 33_000, "unchanged": 0}
    assert list(Tag.objects.values_list("slug", flat=True)) == ["kept"]


def test_empty_source_does_not_wipe_the_target(source: DataSource, tgt: str) -> None:
    _seed()
    run_pull(source, using=tgt)
    Country.objects.all().delete()
    with pytest.raises(PullRefused, match="testapp.copy"):
        run_pull(source, using=tgt)
    assert Copy.objects.using(tgt).count() == 15
    _, counts = run_pull(source, using=tgt, keep_missing=True)
    assert Copy.objects.using(tgt).count() == 15
    run_pull(source, using=tgt, allow_mass_delete=True)
    assert Copy.objects.using(tgt).count() == 0


def test_dry_run_writes_nothing(source: DataSource, tgt: str) -> None:
    _seed()
    _, counts = run_pull(source, using=tgt, dry_run=True)
    assert counts["testapp.copy"]["created"] == 15
    assert Copy.objects.using(tgt).count() == 0
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == 0
    # The temporary tables went with the rollback: a real pull right after works.
    run_pull(source, using=tgt)
    assert state(tgt) == state("default")


def test_a_row_that_cannot_be_applied_leaves_target_as_it_was(source: DataSource, tgt: str) -> None:
    _seed()
    run_pull(source, using=tgt)
    before = state(tgt)
    Category.objects.create(slug="new")  # written early in the pull, then rolled back
    Copy.objects.filter(key="k0").update(value="changed")
    # SQLite does not enforce max_length; the target's database refuses the value.
    Country.objects.create(code="abc")
    record = execute(DataPull.objects.using(tgt).create(source=source), using=tgt)
    assert record.status == DataPull.FAILED
    assert record.finished_at is not None and record.error
    assert state(tgt) == before
    assert record.runner == this_runner()


def test_source_down_mid_pull_changes_nothing(source_process: SourceProcess, settings: Any) -> None:
    """The source process is killed after the first page was applied."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 2
    _seed(using="postgres")
    ds = DataSource.objects.create(name="p", url=source_process.url, client_name="t", secrets="pw")
    seen: list[Progress] = []

    def kill_after_first_page(p: Progress) -> None:
        seen.append(p)
        if len(seen) == 1:
            source_process.stop()

    with pytest.raises(SourceUnavailable):
        run_pull(ds, using="default", progress=kill_after_first_page)
    assert seen[0].done == 2
    assert all(not m.objects.exists() for m in (Category, Country, Language, Copy, Tag))
    ds.refresh_from_db()
    assert ds.checkpoint == 0


def test_unreachable_source_is_recorded(live_server, tgt: str) -> None:  # type: ignore[no-untyped-def]
    src = DataSource.objects.using(tgt).create(
        name="down", url="http://127.0.0.1:9/sync/", client_name="t", secrets="pw"
    )
    record = execute(DataPull.objects.using(tgt).create(source=src), using=tgt)
    assert record.status == DataPull.FAILED
    assert "127.0.0.1:9" in record.error


# --------------------------------------------------------------------------- progress


def test_command_prints_plain_lines_when_not_a_tty(source: DataSource, tgt: str) -> None:
    _seed(keys=30)
    out = io.StringIO()
    call_command("changefeed_pull", "hq", database=tgt, stdout=out)
    text = out.getvalue()
    assert "\r" not in text and "\033" not in text
    lines = text.splitlines()
    copy_lines = [line for line in lines if "testapp.copy:" in line and " of " in line]
    assert copy_lines[-1].endswith("testapp.copy: 90 of 90 rows (100%)")
    assert "testapp.copy: 90 created, 0 updated, 0 deleted, 0 unchanged" in lines
    assert lines[-1].startswith("pull #") and "succeeded" in lines[-1]


def test_command_draws_a_bar_on_a_tty(source: DataSource, tgt: str, settings: Any) -> None:
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 10
    _seed(keys=30)
    master, replica = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    with open(replica, "w", encoding="utf-8", closefd=True) as terminal:
        assert terminal.isatty()
        call_command("changefeed_pull", "hq", database=tgt, stdout=terminal)
    reader.join(10)
    os.close(master)
    text = b"".join(chunks).decode()
    assert "\r\033[K" in text
    assert "testapp.copy" in text and "[" + "#" * 30 + "] 90/90 100%" in text
    assert "10/90" in text  # redrawn page by page
    assert "testapp.copy: 90 created" in text


# --------------------------------------------------------------------------- stale runs


def test_stale_runs_are_failed_with_the_reason(source: DataSource, tgt: str) -> None:
    _seed()
    old = timezone.now() - timedelta(hours=1)
    pulls = DataPull.objects.using(tgt)
    elsewhere = pulls.create(
        source=source, status=DataPull.RUNNING, runner="elsewhere:1", heartbeat_at=old
    )
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    dead = f"{this_runner().rpartition(':')[0]}:{finished.stdout.strip()}"
    gone = pulls.create(
        source=source, status=DataPull.RUNNING, runner=dead, heartbeat_at=timezone.now()
    )
    other = DataSource.objects.using(tgt).create(
        name="other", url=source.url, client_name="t", secrets="pw"
    )
    alive = pulls.create(
        source=other, status=DataPull.RUNNING, runner=this_runner(), heartbeat_at=timezone.now()
    )
    out = io.StringIO()
    err = io.StringIO()
    call_command("changefeed_pull", "hq", database=tgt, stdout=out, stderr=err)
    elsewhere.refresh_from_db()
    gone.refresh_from_db()
    alive.refresh_from_db()
    assert elsewhere.status == DataPull.FAILED
    assert elsewhere.error == f"runner elsewhere:1 stopped responding at {old.isoformat()}"
    assert gone.status == DataPull.FAILED
    assert gone.error.startswith(f"runner {dead} stopped responding at ")
    assert "process is gone" in gone.error
    assert alive.status == DataPull.RUNNING  # alive and beating: left alone
    assert f"pull #{elsewhere.pk} of hq marked failed" in err.getvalue()
    assert "succeeded" in out.getvalue()
    assert state(tgt) == state("default")
    # A live run of the same source blocks a second one instead of racing it.
    blocked = execute(pulls.create(source=other), using=tgt)
    assert blocked.status == DataPull.FAILED
    assert f"pull #{alive.pk} of the same source is still running" in blocked.error
    assert fail_stale_pulls(tgt) == []


def test_heartbeat_is_written_while_running(
    source_process: SourceProcess,
) -> None:
    """From the heartbeat thread's own connection, while the pull waits on its source."""
    require_alias("mariadb")
    _seed(using="postgres")
    ds = DataSource.objects.using("mariadb").create(
        name="p", url=source_process.url, client_name="t", secrets="pw"
    )
    pull = DataPull.objects.using("mariadb").create(source=ds)
    with _source_blocked():
        thread = start_in_background(pull.pk, "mariadb")
        deadline = time.monotonic() + 15
        while True:
            row = DataPull.objects.using("mariadb").get(pk=pull.pk)
            if row.heartbeat_at and row.started_at and row.heartbeat_at > row.started_at:
                break
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.1)
        assert row.status == DataPull.RUNNING and row.runner == this_runner()
        assert fail_stale_pulls("mariadb") == []
    thread.join(60)
    pull.refresh_from_db(using="mariadb")
    assert pull.status == DataPull.SUCCEEDED, pull.error
    assert pull.progress == "done"


class _source_blocked:
    """Hold a lock on the source's Target table: its requests wait (a hung source)."""

    def __enter__(self) -> None:
        import psycopg

        cfg = connections["postgres"].settings_dict
        self.conn = psycopg.connect(
            host=cfg["HOST"], port=int(cfg["PORT"]), user=cfg["USER"],
            password=cfg["PASSWORD"] or None, dbname=cfg["NAME"],
        )  # fmt: skip
        self.conn.execute("LOCK TABLE changefeed_sync_target IN ACCESS EXCLUSIVE MODE")

    def __exit__(self, *exc: Any) -> None:
        self.conn.rollback()
        self.conn.close()


def test_killed_command_is_failed_in_the_admin_and_rerun(
    source_process: SourceProcess, admin_client: Client, tmp_path: Path
) -> None:
    """``manage.py changefeed_pull`` killed mid-run: the admin shows it failed with the
    reason, "Re-run selected pulls" starts a new one with the same options."""
    _seed(using="postgres")
    ds = DataSource.objects.create(name="p", url=source_process.url, client_name="t", secrets="pw")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.e2e_settings",
        "CFS_DATABASE_URL": database_url("default"),
    }
    log = open(tmp_path / "pull.log", "wb")
    with _source_blocked():
        command = subprocess.Popen(
            [sys.executable, "-m", "django", "changefeed_pull", "p", "--keep-missing"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not DataPull.objects.filter(status=DataPull.RUNNING).exists():
                assert command.poll() is None, (tmp_path / "pull.log").read_text()
                assert time.monotonic() < deadline, "the command never started its pull"
                time.sleep(0.05)
        finally:
            command.kill()
            command.wait(10)
            log.close()
    killed = DataPull.objects.get()
    assert killed.runner.endswith(f":{command.pid}")
    page = admin_client.get(reverse("admin:changefeed_sync_datapull_changelist"))
    assert page.status_code == 200
    killed.refresh_from_db()
    assert killed.status == DataPull.FAILED
    assert killed.error.startswith(f"runner {killed.runner} stopped responding at ")
    assert "stopped responding" in page.content.decode() or killed.error

    response = admin_client.post(
        reverse("admin:changefeed_sync_datapull_changelist"),
        {"action": "rerun", "_selected_action": [killed.pk]},
    )
    assert response.status_code == 302
    again = DataPull.objects.exclude(pk=killed.pk).get()
    assert again.keep_missing and again.source_id == ds.pk
    deadline = time.monotonic() + 60
    while again.status in (DataPull.PENDING, DataPull.RUNNING):
        assert time.monotonic() < deadline, "re-run did not finish"
        time.sleep(0.1)
        again.refresh_from_db()
    assert again.status == DataPull.SUCCEEDED, again.error
    assert state("default") == state("postgres")
    assert User.objects.count() == 1  # the admin's own rows were not touched
    assert registry.is_registered(Document)
