"""Cloud Tasks delivery for real: the project's google-cloud-tasks client, gcloud-tasks-emulator,
and a target site in its own process that the emulator POSTs every task to.

The source is this pytest process ("default" database, CloudTasksBackend via
override_settings); its live server serves the feed that the target pulls when a
pushed batch starts beyond its checkpoint. The target is a ``runserver`` of
tests/servers.py on its own SQLite database. The emulator (tests/emulator.py) runs
from its own virtualenv; when it cannot be installed or started the tests are
skipped, and fail under CI=true.

The emulator sends no OIDC token, so the target's Data Source asks for none here
(tests/test_oidc.py covers OIDC).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from changefeed_sync.models import Target
from changefeed_sync.source import feed, push
from changefeed_sync.source.delivery.cloud_tasks import CloudTasksBackend
from tests import dbs
from tests.emulator import Emulator, EmulatorUnavailable
from tests.helpers import state
from tests.servers import Site, free_port, wait_until
from tests.testapp.models import Copy, Country, Language

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(180),
]

SECRET = "cloud-tasks-secret"

RESET_TARGET = """
from changefeed_sync.models import DataSource, Nonce
from tests.testapp.models import Category, Copy, Country, Kinds, Language, Tag
for model in (Copy, Language, Country, Tag, Category, Kinds):
    model._base_manager.all().delete()
Nonce.objects.all().delete()
DataSource.objects.all().delete()
DataSource.objects.create(name="src", url={url!r}, client_name="tgt", secrets={secret!r})
"""

DUMP_STATE = """
from tests.helpers import state
print(json.dumps({
    label: {json.dumps(list(key)): data for key, data in rows.items()}
    for label, rows in state("default").items()
}))
"""

_queues = itertools.count(1)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    emu = Emulator(log)
    try:
        emu.start()
    except EmulatorUnavailable as exc:
        message = f"gcloud-tasks-emulator unavailable: {exc}"
        if dbs.in_ci():
            pytest.fail(f"{message} (CI=true: a missing service is an error)")
        pytest.skip(message)
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="module")
def target_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site("tgt", "sqlite", tmp_path_factory.mktemp("cloud-tasks-target"))
    try:
        site.start_shell()
        site.create_database()
        site.migrate()
        site.start_server()
        yield site
    finally:
        site.close()


@pytest.fixture
def queue(emulator: Emulator) -> Iterator[str]:
    """A fresh queue per test; purged afterwards, so a task left retrying stops."""
    name = f"push-{next(_queues)}"
    emulator.create_queue(name)
    try:
        yield name
    finally:
        emulator.client.purge_queue(name=emulator.queue_path(name))


@pytest.fixture
def target(live_server: Any, target_site: Site, emulator: Emulator, queue: str) -> Iterator[Target]:
    """The source's Target for the target site, Cloud Tasks configured for ``queue``."""
    target_site.run_python(RESET_TARGET.format(url=live_server.url + "/sync/", secret=SECRET))
    created = Target.objects.create(
        name="tgt", secrets=SECRET, webhook_url=f"{target_site.url}sync/webhook/src/"
    )
    push.forget_targets()
    with override_settings(**emulator.settings(queue)):
        yield created
    push.forget_targets()


def last_event_id() -> int:
    """The feed position of the newest event (positions are given after commit)."""
    return feed.head("default")


def checkpoint(site: Site) -> int:
    return int(site.scalar("SELECT checkpoint FROM changefeed_sync_datasource WHERE name = 'src'"))


def source_state() -> dict[str, Any]:
    dumped = {
        label: {json.dumps(list(key)): data for key, data in rows.items()}
        for label, rows in state("default").items()
    }
    return json.loads(json.dumps(dumped))  # as the target's dump went: through JSON


def assert_target_equals_source(site: Site) -> None:
    assert site.run_python(DUMP_STATE) == source_state()


def wait_for_checkpoint(site: Site, seq: int, timeout: float = 15.0) -> None:
    wait_until(lambda: checkpoint(site) == seq, timeout=timeout,
               what=f"the target's checkpoint to reach {seq}")


def webhook_posts(site: Site) -> list[str]:
    """The target server's access log lines of webhook requests, oldest first."""
    assert site.server is not None
    return [line for line in site.server.stderr().splitlines() if "POST /sync/webhook/" in line]


def task_id(target: Target, since: int, last_seq: int) -> str:
    return f"{target.name}-{since}-{last_seq}"


# ---------------------------------------------------------------------- delivery


def test_commits_reach_the_target_server_through_the_emulator(
    target: Target, target_site: Site, emulator: Emulator, queue: str
) -> None:
    fr = Country.objects.create(code="fr", name="France")
    first = last_event_id()
    lang = Language.objects.create(country=fr, code="fr", name="Français")
    second = last_event_id()
    Copy.objects.create(language=lang, key="hello", value="Bonjour")
    third = last_event_id()

    wait_for_checkpoint(target_site, third)
    assert_target_equals_source(target_site)
    # One task per commit, named after its batch, each dispatched once and answered 2xx.
    expected = [task_id(target, 0, first), task_id(target, first, second),
                task_id(target, second, third)]
    dispatched = [name.rsplit("/", 1)[-1] for name in emulator.dispatches()]
    for name in expected:
        assert dispatched.count(name) == 1, (name, dispatched)
        assert emulator.failed_dispatches(name) == 0, emulator.log()
    wait_until(lambda: emulator.tasks(queue) == [], timeout=5, what="the queue to drain")
    target.refresh_from_db()
    assert target.delivered_seq == third  # for this backend: enqueued up to here
    assert target.failures == 0 and target.last_error == ""


def test_the_same_batch_enqueued_twice_converges(
    target: Target, target_site: Site, emulator: Emulator, queue: str
) -> None:
    """Cloud Tasks refuses a second task of the same name (AlreadyExists, which the backend
    ignores); the emulator has no such deduplication and delivers both. Either way the
    target applies the batch once and acknowledges the copy."""
    Target.objects.filter(pk=target.pk).update(paused=True)  # enqueue by hand below
    push.forget_targets()
    Country.objects.create(code="aa", name="A")
    Country.objects.create(code="bb", name="B")
    last = last_event_id()
    Target.objects.filter(pk=target.pk).update(paused=False)
    target.refresh_from_db()

    posts_before = len(webhook_posts(target_site))
    backend = CloudTasksBackend()
    assert backend.enqueue_pending(target, "default") == 1
    target.refresh_from_db()
    assert target.delivered_seq == last
    Target.objects.filter(pk=target.pk).update(delivered_seq=0)  # as if another process
    target.refresh_from_db()  # had enqueued it at the same moment
    # Real Cloud Tasks: AlreadyExists, 0 created. The emulator accepts the duplicate.
    assert backend.enqueue_pending(target, "default") == 1

    name = task_id(target, 0, last)
    wait_until(lambda: len(emulator.dispatches(name)) == 2, timeout=10,
               what="both copies of the task to be dispatched")
    wait_until(lambda: emulator.tasks(queue) == [], timeout=5, what="the queue to drain")
    assert emulator.failed_dispatches(name) == 0, emulator.log()  # the copy got a 2xx too
    assert checkpoint(target_site) == last
    assert_target_equals_source(target_site)
    posts = webhook_posts(target_site)[posts_before:]
    assert len(posts) == 2 and all('" 200 ' in line for line in posts), posts


def test_big_batches_are_split_into_tasks_under_100_kb(
    target: Target, target_site: Site, emulator: Emulator, queue: str
) -> None:
    emulator.client.pause_queue(name=emulator.queue_path(queue))  # keep the tasks to look at
    fr = Country.objects.create(code="fr", name="France")
    lang = Language.objects.create(country=fr, code="fr", name="Français")
    # One commit of 200 events of ~1.6 KB each: far more than one body may carry.
    Copy.objects.bulk_create(
        [Copy(language=lang, key=f"k{i:03d}", value=f"{i}:" + "é" * 800) for i in range(200)]
    )
    last = last_event_id()
    target.refresh_from_db()
    assert target.delivered_seq == last  # all enqueued

    tasks = sorted(emulator.tasks(queue), key=lambda t: json.loads(t.http_request.body)["since"])
    bodies = [json.loads(t.http_request.body) for t in tasks]
    sizes = [len(t.http_request.body) for t in tasks]
    assert len(tasks) >= 4, sizes
    assert max(sizes) <= 90_000 < 100 * 1024, sizes
    # Contiguous: each body starts where the previous one ended, from 0 to the last event.
    assert bodies[0]["since"] == 0 and bodies[-1]["last_seq"] == last
    for before, after in zip(bodies, bodies[1:]):
        assert after["since"] == before["last_seq"]
    for task, body in zip(tasks, bodies):
        assert task.name.rsplit("/", 1)[-1] == task_id(target, body["since"], body["last_seq"])
        assert body["events"][-1]["seq"] == body["last_seq"]
    assert sum(len(b["events"]) for b in bodies) == 202

    emulator.client.resume_queue(name=emulator.queue_path(queue))
    wait_for_checkpoint(target_site, last, timeout=30)
    assert_target_equals_source(target_site)
    assert target_site.scalar("SELECT COUNT(*) FROM testapp_copy") == 200


def test_a_task_retried_after_a_failed_catch_up_succeeds(
    target: Target, target_site: Site, emulator: Emulator, queue: str, live_server: Any
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/sync/"
    target_site.query("UPDATE changefeed_sync_datasource SET url = %s WHERE name = 'src'", [dead])
    Target.objects.filter(pk=target.pk).update(paused=True)
    push.forget_targets()
    Country.objects.create(code="aa", name="lost")
    lost = last_event_id()
    # That delivery was lost: the source believes it went out.
    Target.objects.filter(pk=target.pk).update(paused=False, delivered_seq=lost)
    push.forget_targets()
    Country.objects.create(code="bb", name="beyond the gap")
    last = last_event_id()
    name = task_id(target, lost, last)

    # The batch starts beyond the target's checkpoint, the catch-up pull cannot reach the
    # source: the target answers 503 and the emulator retries.
    wait_until(lambda: emulator.failed_dispatches(name) >= 2, timeout=10,
               what="the task to fail and be retried")
    assert checkpoint(target_site) == 0
    target_site.query(
        "UPDATE changefeed_sync_datasource SET url = %s WHERE name = 'src'",
        [live_server.url + "/sync/"],
    )
    # The source is reachable again: the next retry must catch up and succeed.
    wait_for_checkpoint(target_site, last, timeout=10)
    wait_until(lambda: emulator.tasks(queue) == [], timeout=5, what="the queue to drain")
    assert_target_equals_source(target_site)


# ---------------------------------------------------------------------- short-lived writers


def test_a_process_that_exits_right_after_a_write_created_its_task(
    target_site: Site, emulator: Emulator, queue: str, tmp_path: Path
) -> None:
    """``manage.py shell -c`` writes one row and exits: the task was created in the
    committing thread, before ``create()`` returned, so Cloud Tasks delivers it with no
    process of the source left running."""
    from tests.test_push_exit import write_and_exit

    target_site.run_python(RESET_TARGET.format(url="http://127.0.0.1:9/sync/", secret=SECRET))
    source = Site("src", "sqlite", tmp_path)
    try:
        source.start_shell()
        source.create_database()
        source.migrate()
        source.run_python(f"""
            from changefeed_sync.models import Target
            Target.objects.create(name="tgt", secrets={SECRET!r},
                                  webhook_url={target_site.url + "sync/webhook/src/"!r})
        """)
        took, stderr = write_and_exit(source, "ct", emulator.settings(queue))
        assert "Traceback" not in stderr, stderr
        last = int(source.run_python(
            "from changefeed_sync.source import feed; print(feed.head('default'))"
        ))
        enqueued = source.scalar(
            "SELECT delivered_seq FROM changefeed_sync_target WHERE name = 'tgt'"
        )
    finally:
        source.close()
    assert enqueued == last  # recorded as enqueued by the process that wrote
    wait_for_checkpoint(target_site, last)
    assert emulator.dispatches(task_id(Target(name="tgt"), 0, last))
    assert target_site.scalar("SELECT COUNT(*) FROM testapp_country WHERE code = 'ct'") == 1


# ---------------------------------------------------------------------- many targets


def test_one_commit_to_50_targets_one_read_one_update_bounded_threads(
    emulator: Emulator, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 Targets at the same position: one feed read, a task per target created before
    ``create()`` returns by at most CREATE_CONCURRENCY threads over one client, one
    UPDATE recording them as enqueued. The emulator POSTs each to a loopback receiver
    that checks the signature."""
    from changefeed_sync.source import feed
    from changefeed_sync.source.delivery import cloud_tasks
    from tests.receivers import running

    reads: list[int] = []
    writes: list[dict[int, int]] = []
    real_read, real_record = feed.read, push.record_successes

    def read(since: int, *args: Any, **kwargs: Any) -> Any:
        reads.append(since)
        return real_read(since, *args, **kwargs)

    def record(acknowledged: dict[int, int], using: str) -> None:
        writes.append(dict(acknowledged))
        real_record(acknowledged, using)

    monkeypatch.setattr(feed, "read", read)
    monkeypatch.setattr(push, "record_successes", record)
    with running(SECRET) as receiver, override_settings(**emulator.settings(queue)):
        feed.head("default")  # the outbox's state row, made before anything races for it
        names = [f"t{i:02d}" for i in range(50)]
        Target.objects.bulk_create(
            Target(name=n, secrets=SECRET, webhook_url=receiver.webhook_url(n)) for n in names
        )
        push.forget_targets()
        backend = CloudTasksBackend()
        monkeypatch.setattr(push, "_backend", backend)
        monkeypatch.setattr(push, "_backend_path", emulator.settings(queue)[
            "CHANGEFEED_SYNC_DELIVERY_BACKEND"])
        before = {t.ident for t in threading.enumerate()}

        Country.objects.create(code="fr", name="France")
        last = last_event_id()
        # Enqueued before create() returned, recorded in one statement.
        assert reads == [0] and writes == [{t.pk: last for t in Target.objects.all()}]
        started = [
            t.name for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("changefeed-push")
        ]
        assert all(name.startswith("changefeed-push-cloudtasks") for name in started), started
        assert 1 <= len(started) <= cloud_tasks.CREATE_CONCURRENCY, started
        assert backend._client is not None and backend.client is backend._client  # one client

        receiver.wait_for_seq(names, last, timeout=60)
        assert receiver.refused == []
        for name in names:
            assert receiver.spans(name)[0] == (0, last)
    dispatched = {n.rsplit("/", 1)[-1] for n in emulator.dispatches()}
    assert {task_id(Target(name=n), 0, last) for n in names} <= dispatched
