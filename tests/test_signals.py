"""``events_committed``: sent once a transaction that wrote events commits, never
before and never for a rollback; the outbox's readers (long-poll, push) listen to
it, and a failing receiver never reaches the writer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

from changefeed_sync.models import Event
from changefeed_sync.signals import events_committed
from changefeed_sync.source import notifier, push
from tests.testapp.models import Country, Plain

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture
def heard() -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        calls.append({"sender": sender, **kwargs})

    events_committed.connect(receiver, dispatch_uid="test_signals")
    try:
        yield calls
    finally:
        events_committed.disconnect(dispatch_uid="test_signals")


def test_sent_after_commit_with_the_alias(db_alias: str, heard: list[dict[str, Any]]) -> None:
    with transaction.atomic(using=db_alias):
        Country.objects.using(db_alias).create(code="fr", name="France")
        Country.objects.using(db_alias).create(code="be", name="Belgium")
        assert heard == []  # not before the commit
    assert [(c["sender"], c["using"]) for c in heard] == [(Event, db_alias)] * len(heard)
    assert heard, "no events_committed after a commit that wrote events"


def test_autocommit_save_sends_it_once(db_alias: str, heard: list[dict[str, Any]]) -> None:
    Country.objects.using(db_alias).create(code="fr", name="France")
    assert [c["using"] for c in heard] == [db_alias]


def test_not_sent_for_a_rollback_or_for_unregistered_models(
    db_alias: str, heard: list[dict[str, Any]]
) -> None:
    with pytest.raises(ZeroDivisionError), transaction.atomic(using=db_alias):
        Country.objects.using(db_alias).create(code="fr", name="France")
        1 / 0  # noqa: B018
    Plain.objects.using(db_alias).create(code="xx")
    assert heard == []
    assert not Event.objects.using(db_alias).exists()


def test_a_failing_receiver_neither_fails_the_writer_nor_stops_the_others(
    db_alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[str] = []

    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    def after(sender: Any, using: str, **kwargs: Any) -> None:
        heard.append(using)

    events_committed.connect(broken, dispatch_uid="test_signals_broken")
    events_committed.connect(after, dispatch_uid="test_signals_after")  # runs after broken
    try:
        with caplog.at_level(logging.ERROR, logger="django.dispatch"):
            Country.objects.using(db_alias).create(code="fr", name="France")
    finally:
        events_committed.disconnect(dispatch_uid="test_signals_broken")
        events_committed.disconnect(dispatch_uid="test_signals_after")
    assert Country.objects.using(db_alias).filter(code="fr").exists()
    assert heard == [db_alias]
    assert "receiver broke" in caplog.text


def test_the_readers_listen_from_ready() -> None:
    """The outbox imports neither reader: they are connected in AppConfig.ready."""
    live = [r() for _, r, *_ in events_committed.receivers]  # weak references
    assert notifier.on_events_committed in live
    assert push.on_events_committed in live
