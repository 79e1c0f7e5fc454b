"""Delivery through Django's task framework (``django.tasks`` on Django 6, the
``django-tasks`` backport before: the same module changefeed_sync imports is used here).

The source is the "default" database; a live server receives the webhooks and applies
them into PostgreSQL (CHANGEFEED_SYNC_TARGET_DATABASE). ImmediateBackend runs each task
as it is enqueued; DummyBackend only keeps them, so the test plays the worker and sees
the deferred retry a failed delivery enqueues.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from changefeed_sync.models import DataSource, Target
from changefeed_sync.source import push
from changefeed_sync.source.delivery import django_tasks as delivery
from tests.dbs import require_alias
from tests.helpers import state
from tests.servers import free_port
from tests.testapp.models import Country, Language

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])

#: "django.tasks" or "django_tasks", whichever changefeed_sync's backend imported.
TASKS_PACKAGE = "django.tasks" if delivery.task.__module__.startswith("django.tasks") else "django_tasks"
tasks = importlib.import_module(TASKS_PACKAGE)
# Connects the backport's setting_changed receiver, so override_settings(TASKS=...) applies.
importlib.import_module(f"{TASKS_PACKAGE}.signals")

BACKEND = "changefeed_sync.source.delivery.django_tasks.DjangoTasksBackend"
TGT = "postgres"


def task_backend(name: str) -> dict[str, Any]:
    return {"default": {"BACKEND": f"{TASKS_PACKAGE}.backends.{name}"}}


@pytest.fixture
def sites(live_server: Any) -> Iterator[tuple[Target, DataSource]]:
    require_alias(TGT)
    source = DataSource.objects.using(TGT).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets="pw"
    )
    target = Target.objects.create(
        name="regional", secrets="pw", webhook_url=live_server.url + "/sync/webhook/hq/"
    )
    push.forget_targets()
    with override_settings(
        CHANGEFEED_SYNC_TARGET_DATABASE=TGT, CHANGEFEED_SYNC_DELIVERY_BACKEND=BACKEND
    ):
        yield target, source
    push.forget_targets()


@pytest.fixture
def finished() -> Iterator[list[Any]]:
    """Results of the tasks that ran, as the framework's task_finished signal reports them."""
    signals = importlib.import_module(f"{TASKS_PACKAGE}.signals")
    results: list[Any] = []

    def collect(sender: Any, task_result: Any, **kwargs: Any) -> None:
        results.append(task_result)

    signals.task_finished.connect(collect)
    yield results
    signals.task_finished.disconnect(collect)


def test_immediate_backend_delivers_in_the_committing_request(
    sites: tuple[Target, DataSource], finished: list[Any]
) -> None:
    target, source = sites
    with override_settings(TASKS=task_backend("immediate.ImmediateBackend")):
        fr = Country.objects.create(code="fr", name="France")
        # ImmediateBackend ran the task before create() returned: already on the target.
        assert Country.objects.using(TGT).get(code="fr").name == "France"
        Language.objects.create(country=fr, code="fr", name="Français")
        assert Language.objects.using(TGT).filter(code="fr").exists()
        fr.name = "République française"
        fr.save()
    assert state(TGT) == state("default")
    assert [r.task.name for r in finished] == ["deliver"] * 3
    assert all(r.status.name == "SUCCESSFUL" for r in finished), [r.errors for r in finished]
    assert [r.args for r in finished] == [[target.pk, "default"]] * 3
    target.refresh_from_db()
    source.refresh_from_db(using=TGT)
    assert target.delivered_seq == source.checkpoint > 0
    assert target.failures == 0 and target.last_delivery_at is not None


def test_a_failing_delivery_records_the_failure_then_recovers(
    sites: tuple[Target, DataSource], finished: list[Any]
) -> None:
    target, source = sites
    good_url = target.webhook_url
    Target.objects.filter(pk=target.pk).update(
        webhook_url=good_url.replace("/webhook/hq/", "/webhook/unknown/")
    )
    with override_settings(
        TASKS=task_backend("immediate.ImmediateBackend"),
        CHANGEFEED_SYNC_DELIVERY_RETRY_DELAYS=[0, 0.3],
    ):
        Country.objects.create(code="aa")
        target.refresh_from_db()
        assert target.failures == 1
        # An unknown source name is answered as bad credentials (no name is revealed).
        assert "HTTP 403" in target.last_error and "authentication_failed" in target.last_error
        assert target.last_error_at is not None and target.next_attempt_at is not None
        assert target.delivered_seq == 0
        assert not Country.objects.using(TGT).exists()
        # The task itself ended normally: the failure is the Target's, shown in the admin.
        assert finished[-1].status.name == "SUCCESSFUL"

        Target.objects.filter(pk=target.pk).update(webhook_url=good_url)
        # ImmediateBackend cannot defer the retry: the next commit after the backoff delivers.
        target.refresh_from_db()
        remaining = (target.next_attempt_at - timezone.now()).total_seconds()
        assert 0 < remaining <= 0.3
        Country.objects.create(code="bb")  # within the backoff: not attempted
        target.refresh_from_db()
        assert target.failures == 1 and not Country.objects.using(TGT).exists()
        wait = (target.next_attempt_at - timezone.now()).total_seconds()
        time.sleep(max(wait, 0) + 0.05)
        Country.objects.create(code="cc")
    target.refresh_from_db()
    assert target.failures == 0 and target.last_error == "" and target.next_attempt_at is None
    assert sorted(Country.objects.using(TGT).values_list("code", flat=True)) == ["aa", "bb", "cc"]
    assert state(TGT) == state("default")


def test_a_worker_backend_gets_a_deferred_retry(sites: tuple[Target, DataSource]) -> None:
    """With a backend that can defer (DummyBackend here, a database or RQ worker in real
    life) a failed delivery enqueues its own retry for after the backoff."""
    target, source = sites
    good_url = target.webhook_url
    Target.objects.filter(pk=target.pk).update(
        webhook_url=f"http://127.0.0.1:{free_port()}/sync/webhook/hq/"  # nobody listens
    )
    with override_settings(
        TASKS=task_backend("dummy.DummyBackend"), CHANGEFEED_SYNC_DELIVERY_RETRY_DELAYS=[0, 120]
    ):
        queue = tasks.default_task_backend
        queue.clear()
        Country.objects.create(code="aa")
        assert not Country.objects.using(TGT).exists()  # enqueued, not run
        [first] = queue.results
        assert first.task.name == "deliver" and first.task.run_after is None
        assert first.args == [target.pk, "default"]

        before = timezone.now()
        first.task.call(*first.args)  # the worker runs it: the target is down
        target.refresh_from_db()
        assert target.failures == 1 and "Connection refused" in target.last_error
        [_, retry] = queue.results
        assert retry.task.name == "deliver" and retry.args == first.args
        assert before + timedelta(seconds=119) < retry.task.run_after
        assert retry.task.run_after < timezone.now() + timedelta(seconds=121)

        Target.objects.filter(pk=target.pk).update(webhook_url=good_url, next_attempt_at=None)
        retry.task.call(*retry.args)  # the worker, once run_after has come
    assert Country.objects.using(TGT).filter(code="aa").exists()
    target.refresh_from_db()
    assert target.failures == 0 and target.last_error == ""
    assert state(TGT) == state("default")


def test_a_task_queued_before_the_upgrade_still_runs(sites: tuple[Target, DataSource]) -> None:
    """A worker finds a queued task by its dotted path. Tasks queued before the
    backends moved to changefeed_sync.source.delivery name the old module: it still
    holds the same task, and running it delivers."""
    from django.utils.module_loading import import_string

    target, source = sites
    old = import_string("changefeed_sync.delivery.django_tasks.deliver")
    assert old is delivery.deliver
    with override_settings(TASKS=task_backend("dummy.DummyBackend")):
        queue = tasks.default_task_backend
        queue.clear()
        Country.objects.create(code="aa")
        [queued] = queue.results
        assert not Country.objects.using(TGT).exists()
        old.call(*queued.args)  # what the worker runs, found at the old path
    assert Country.objects.using(TGT).filter(code="aa").exists()
    assert state(TGT) == state("default")
