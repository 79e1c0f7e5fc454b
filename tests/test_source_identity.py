"""A source's positions belong to its identity (``OutboxState.source_id``): a cursor
beyond its head is refused (409 ``cursor_ahead``, never recorded), and a target whose
source was reset or replaced stops with "source was reset or replaced: run a full Data
Pull" (follower, webhook, ``changefeed_sync``), recorded on the Data Source, until a
full Data Pull records the new identity.

The source is this process's SQLite "default" database behind a live server (real
HTTP); targets are PostgreSQL and MariaDB. The migration is tested on all three.
"""

from __future__ import annotations

import io
import json
import re
import threading
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from django.core.management import CommandError, call_command
from django.db import connections
from django.db.migrations.executor import MigrationExecutor
from django.test import Client

from changefeed_sync.exceptions import ProtocolError, SourceReset
from changefeed_sync.management.commands.changefeed_prune import prune
from changefeed_sync.models import DataSource, Event, OutboxState, Target
from changefeed_sync.signing import sign_request
from changefeed_sync.source import feed, push, sequencer
from changefeed_sync.status import source_rows
from changefeed_sync.target.client import FetchedPage, SourceClient
from changefeed_sync.target.follow import check_source_id, sync
from changefeed_sync.target.pull import run_pull
from tests.dbs import require_alias
from tests.testapp.models import Country

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(120),
]

SECRET = "identity-test-secret"
RESET = "source was reset or replaced: run a full Data Pull"
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(params=["postgres", "mariadb"])
def tgt(request: pytest.FixtureRequest) -> str:
    require_alias(request.param)
    return str(request.param)


@pytest.fixture
def ds(live_server, tgt: str) -> DataSource:  # type: ignore[no-untyped-def]
    Target.objects.create(name="regional", secrets=SECRET)
    return DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets=SECRET
    )


def _get(base: str, path: str, **params: Any) -> requests.Response:
    path = f"/sync/{path}" + (f"?{urlencode(params)}" if params else "")
    auth = sign_request("regional", [SECRET], "GET", path)
    return requests.get(base + path, headers={"Authorization": auth}, timeout=30)


def _identity() -> str:
    return sequencer.state("default").source_id


# ---------------------------------------------------------------- the source


def test_feed_pages_snapshots_and_webhooks_carry_the_identity(live_server) -> None:  # type: ignore[no-untyped-def]
    Target.objects.create(name="regional", secrets=SECRET, webhook_url="http://127.0.0.1:9/",
                          paused=True)  # fmt: skip
    Country.objects.create(code="fr")
    identity = _identity()
    assert HEX32.fullmatch(identity)
    assert _get(live_server.url, "feed/", since=0).json()["source_id"] == identity
    assert _get(live_server.url, "snapshot/").json()["source_id"] == identity
    batch = next(push.batches(Target.objects.get(), "default"))
    assert json.loads(batch.body)["source_id"] == identity
    assert _identity() == identity  # stable


def test_a_flushed_outbox_is_a_new_source_and_the_command_draws_one() -> None:
    first = _identity()
    OutboxState.objects.all().delete()  # what `manage.py flush` does
    assert HEX32.fullmatch(second := _identity()) and second != first
    out = io.StringIO()
    call_command("changefeed_source_id", stdout=out)
    assert out.getvalue().strip() == second
    call_command("changefeed_source_id", "--reset", stdout=out)
    assert out.getvalue().split()[-1] == _identity() != second


def test_a_cursor_beyond_the_head_is_refused_and_not_recorded(live_server) -> None:  # type: ignore[no-untyped-def]
    target = Target.objects.create(name="regional", secrets=SECRET)
    for code in ("fr", "de"):
        Country.objects.create(code=code)
    head = feed.head("default")
    assert _get(live_server.url, "feed/", since=head).json()["events"] == []
    for since in (head + 1, head + 1000, 2**63 - 1):
        answer = _get(live_server.url, "feed/", since=since, wait=1)
        assert answer.status_code == 409, answer.text
        body = answer.json()
        assert body["code"] == "cursor_ahead"
        assert body["position"] == head and body["source_id"] == _identity()
        assert "run a full Data Pull" in body["error"]
        target.refresh_from_db()
        assert target.last_seen_seq == head  # the refused cursor is not recorded
    # A refused request still counts against replays.
    path = f"/sync/feed/?since={head + 1}"
    auth = sign_request("regional", [SECRET], "GET", path)
    assert (
        requests.get(
            live_server.url + path, headers={"Authorization": auth}, timeout=10
        ).status_code
        == 409
    )
    assert (
        requests.get(
            live_server.url + path, headers={"Authorization": auth}, timeout=10
        ).status_code
        == 403
    )
    # Every event pruned: the last pruned position is still the head.
    prune(timedelta(0), "default")
    assert not Event.objects.exists()
    assert _get(live_server.url, "feed/", since=head).json()["last_seq"] == head
    assert _get(live_server.url, "feed/", since=head + 1).json()["code"] == "cursor_ahead"
    assert _get(live_server.url, "feed/", since=head - 1).json()["code"] == "cursor_expired"
    # ...and where a snapshot starts.
    assert _get(live_server.url, "snapshot/").json()["position"] == head


def test_a_restricted_target_sees_the_head_of_every_model(live_server) -> None:  # type: ignore[no-untyped-def]
    """A Target of tags only, at the position of the last country: not ahead."""
    Target.objects.create(name="regional", secrets=SECRET, model_labels=["testapp.tag"])
    Country.objects.create(code="fr")
    head = feed.head("default")
    assert _get(live_server.url, "feed/", since=head).status_code == 200
    assert _get(live_server.url, "feed/", since=head + 1).status_code == 409


# ---------------------------------------------------------------- the target


def test_a_replaced_source_stops_sync_follow_and_the_command(ds: DataSource, tgt: str) -> None:
    Country.objects.create(code="fr")
    sync(ds, using=tgt)
    ds.refresh_from_db(using=tgt)
    assert ds.source_id == _identity()  # the first sync records it
    checkpoint = ds.checkpoint
    # The source is replaced (another site, or recreated: a new outbox).
    sequencer.reset_source_id("default")
    Country.objects.create(code="de")
    with pytest.raises(SourceReset, match=RESET):
        sync(ds, using=tgt)
    stop = threading.Event()
    with pytest.raises(SourceReset, match=RESET):  # a follower ends: only a pull helps
        sync(ds, using=tgt, follow=True, stop=stop, wait=0.1)
    assert not stop.is_set()
    ds.refresh_from_db(using=tgt)
    assert ds.checkpoint == checkpoint
    assert not Country.objects.using(tgt).filter(code="de").exists()
    assert RESET in ds.last_error and ds.last_error_at is not None
    [row] = source_rows(tgt)
    assert RESET in row["last_error"] and row["source_id"] != _identity()
    out = io.StringIO()
    call_command("changefeed_status", "--database", tgt, stdout=out)
    assert RESET in out.getvalue()
    with pytest.raises(CommandError, match=RESET):
        call_command("changefeed_sync", "hq", "--database", tgt, stdout=io.StringIO())
    with pytest.raises(CommandError, match=RESET):
        call_command("changefeed_sync", "hq", "--database", tgt, "--follow", stdout=io.StringIO())
    # A full Data Pull records the new identity and clears the error.
    run_pull(ds, using=tgt)
    ds.refresh_from_db(using=tgt)
    assert ds.source_id == _identity() and ds.last_error == ""
    assert Country.objects.using(tgt).filter(code="de").exists()
    Country.objects.create(code="nz")
    assert sync(ds, using=tgt).stats.events == 1


def test_a_checkpoint_beyond_the_source_stops_with_the_reset_error(
    ds: DataSource, tgt: str
) -> None:
    """The source restored from an older backup (same identity), or a Data Source
    without a recorded identity pointed at another site."""
    Country.objects.create(code="fr")
    DataSource.objects.using(tgt).filter(pk=ds.pk).update(checkpoint=1_000_000)
    ds.refresh_from_db(using=tgt)
    with pytest.raises(SourceReset, match=RESET) as caught:
        sync(ds, using=tgt)
    assert "1000000 is beyond its last position" in str(caught.value)
    ds.refresh_from_db(using=tgt)
    assert ds.checkpoint == 1_000_000 and RESET in ds.last_error
    assert Target.objects.get().last_seen_seq is None
    assert not Country.objects.using(tgt).exists()


def test_a_pull_records_the_identity_and_resets_a_former_one(ds: DataSource, tgt: str) -> None:
    DataSource.objects.using(tgt).filter(pk=ds.pk).update(source_id="a-former-source")
    ds.refresh_from_db(using=tgt)
    Country.objects.create(code="fr")
    position, _ = run_pull(ds, using=tgt, dry_run=True)
    ds.refresh_from_db(using=tgt)
    assert ds.source_id == "a-former-source"  # a dry run records nothing
    run_pull(ds, using=tgt)
    ds.refresh_from_db(using=tgt)
    assert (ds.source_id, ds.checkpoint) == (_identity(), position)


class _OldSource(SourceClient):
    """A source of an older version: feed pages without ``source_id``."""

    def fetch_feed(self, since: int, limit: int, wait: float = 0.0) -> FetchedPage:
        page = super().fetch_feed(since, limit, wait)
        page.source_id = None
        return page


def test_a_source_without_identity_is_accepted_and_changes_nothing(
    ds: DataSource, tgt: str
) -> None:
    Country.objects.create(code="fr")
    assert sync(ds, using=tgt, client=_OldSource(ds)).stats.events == 1
    ds.refresh_from_db(using=tgt)
    assert ds.source_id == ""  # nothing to record
    DataSource.objects.using(tgt).filter(pk=ds.pk).update(source_id="recorded")
    ds.refresh_from_db(using=tgt)
    Country.objects.create(code="de")
    assert sync(ds, using=tgt, client=_OldSource(ds)).stats.events == 1
    ds.refresh_from_db(using=tgt)
    assert ds.source_id == "recorded"  # kept: a source that says nothing contradicts nothing
    check_source_id(ds, None, using=tgt)
    check_source_id(ds, "recorded", using=tgt)
    with pytest.raises(SourceReset):
        check_source_id(ds, "another", using=tgt)


@pytest.mark.parametrize("claimed", [17, "", "x" * 65, ["a"]])
def test_a_malformed_identity_is_a_protocol_error(ds: DataSource, claimed: Any) -> None:
    from changefeed_sync.target.client import source_id_of

    with pytest.raises(ProtocolError, match="source_id"):
        source_id_of({"source_id": claimed}, "feed page")


# ---------------------------------------------------------------- webhooks


@pytest.fixture
def webhook(live_server, tgt: str, settings: Any) -> tuple[Target, DataSource]:  # type: ignore[no-untyped-def]
    settings.CHANGEFEED_SYNC_TARGET_DATABASE = tgt  # where the webhook applies
    source = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets=SECRET
    )
    target = Target.objects.create(
        name="regional", secrets=SECRET, webhook_url=live_server.url + "/sync/webhook/hq/",
        paused=True,  # batches are posted by the test
    )  # fmt: skip
    push.forget_targets()
    return target, source


def _post(batch: push.Batch) -> requests.Response:
    return requests.post(
        batch.target.webhook_url, data=batch.body, headers=push.signed_headers(batch), timeout=30
    )


def test_a_webhook_from_another_source_is_refused(
    webhook: tuple[Target, DataSource], tgt: str
) -> None:
    target, source = webhook
    DataSource.objects.using(tgt).filter(pk=source.pk).update(source_id="a-former-source")
    Country.objects.create(code="fr")
    batch = next(push.batches(target, "default"))
    answer = _post(batch)
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "source_reset" and RESET in answer.json()["error"]
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == 0 and RESET in source.last_error
    assert not Country.objects.using(tgt).exists()
    # Recorded by a pull (or first seen): accepted.
    DataSource.objects.using(tgt).filter(pk=source.pk).update(source_id="")
    batch = next(push.batches(target, "default"))
    answer = _post(batch)
    assert answer.status_code == 200, answer.text
    source.refresh_from_db(using=tgt)
    assert source.source_id == _identity() and source.checkpoint == batch.last_seq
    assert Country.objects.using(tgt).filter(code="fr").exists()


def test_a_webhook_without_identity_is_accepted(
    webhook: tuple[Target, DataSource], tgt: str
) -> None:
    target, source = webhook
    DataSource.objects.using(tgt).filter(pk=source.pk).update(source_id="recorded")
    Country.objects.create(code="fr")
    events = feed.read(0, 10, using="default").events
    old = push.Batch(target, 0, events[-1]["seq"], push._body(target, 0, events))
    assert b"source_id" not in old.body
    answer = _post(old)
    assert answer.status_code == 200, answer.text
    source.refresh_from_db(using=tgt)
    assert source.source_id == "recorded" and source.checkpoint == old.last_seq


def test_a_webhook_catching_up_from_a_replaced_source_is_refused(
    webhook: tuple[Target, DataSource], tgt: str
) -> None:
    """A batch after a gap makes the target pull the feed, whose answer tells."""
    target, source = webhook
    DataSource.objects.using(tgt).filter(pk=source.pk).update(checkpoint=1_000_000)
    for code in ("fr", "de"):
        Country.objects.create(code=code)
    events = feed.read(0, 10, using="default").events
    # A batch starting after the checkpoint: the target catches up from the feed first.
    body = push._body(target, 1_000_001, [{**events[-1], "seq": 1_000_002}], _identity())
    answer = _post(push.Batch(target, 1_000_001, 1_000_002, body))
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "source_reset"
    source.refresh_from_db(using=tgt)
    assert source.checkpoint == 1_000_000 and not Country.objects.using(tgt).exists()


# ---------------------------------------------------------------- migration, admin


def test_the_migration_gives_an_existing_install_an_identity(db_alias: str) -> None:
    connection = connections[db_alias]
    before = [("changefeed_sync", "0004_secret_validation")]
    after = [("changefeed_sync", "0005_source_identity")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        old = executor.loader.project_state(before).apps
        old.get_model("changefeed_sync", "OutboxState").objects.using(db_alias).get_or_create(id=1)
        event = (
            old.get_model("changefeed_sync", "Event")
            .objects.using(db_alias)
            .create(model="testapp.country", op="upsert", key=["fr"])
        )
        targets = old.get_model("changefeed_sync", "Target").objects.using(db_alias)
        targets.create(name="ok", secrets="x", last_seen_seq=event.id)
        targets.create(name="ahead", secrets="x", last_seen_seq=event.id + 5)
        old.get_model("changefeed_sync", "DataSource").objects.using(db_alias).create(
            name="hq", url="http://x/", client_name="t", secrets="x", checkpoint=7
        )
        executor = MigrationExecutor(connection)
        executor.migrate(after)
        new = executor.loader.project_state(after).apps
        [identity] = (
            new.get_model("changefeed_sync", "OutboxState")
            .objects.using(db_alias)
            .values_list("source_id", flat=True)
        )
        assert HEX32.fullmatch(identity)
        seen = dict(new.get_model("changefeed_sync", "Target").objects.using(db_alias)
                    .values_list("name", "last_seen_seq"))  # fmt: skip
        assert seen == {"ok": event.id, "ahead": None}  # a cursor beyond the head is forgotten
        assert (
            new.get_model("changefeed_sync", "DataSource").objects.using(db_alias).get().source_id
            == ""
        )
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert sequencer.state(db_alias).source_id == identity


def test_the_admin_shows_the_identity_and_the_reset(admin_client: Client) -> None:
    source = DataSource.objects.create(
        name="hq", url="http://127.0.0.1:1/sync/", client_name="t", secrets=SECRET,
        source_id="0123456789abcdef0123456789abcdef",
        last_error=f"{RESET} (Data Source hq: ...)",
    )  # fmt: skip
    page = admin_client.get(f"/admin/changefeed_sync/datasource/{source.pk}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "0123456789abcdef0123456789abcdef" in text and RESET in text
    listing = admin_client.get("/admin/changefeed_sync/datasource/").content.decode()
    assert "source was reset or replaced" in listing
