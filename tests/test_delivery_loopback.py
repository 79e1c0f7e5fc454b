"""The loopback delivery backend: pushed batches reach a target in this process, no HTTP.

The source is the "default" database; the target site is another alias
(CHANGEFEED_SYNC_TARGET_DATABASE, PostgreSQL or MariaDB) whose webhook view gets each
signed batch through Django's test client: verified and applied as over the network,
in the committing thread, so a write's delivery is over when the write returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.test import Client, override_settings

from changefeed_sync.models import DataSource, Target
from changefeed_sync.source import feed, push
from changefeed_sync.source.delivery import loopback
from changefeed_sync.source.delivery.base import DeliveryBackend
from tests.dbs import require_alias
from tests.helpers import state
from tests.testapp.models import Copy, Country, Language

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

LOOPBACK = "changefeed_sync.source.delivery.loopback.LoopbackBackend"


class Webhook:
    """The target site's webhook, called in process; keeps what it was handed."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answers: list[tuple[int, Mapping[str, Any]]] = []

    def __call__(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, Mapping[str, Any]]:
        self.bodies.append(json.loads(body))
        sent = {k: v for k, v in headers.items() if k != "Content-Type"}
        response = Client().generic(
            "POST", urlsplit(url).path, body, content_type=headers["Content-Type"], headers=sent
        )
        answer = (response.status_code, response.json())
        self.answers.append(answer)
        return answer

    def statuses(self) -> list[tuple[int, str]]:
        return [(status, answer.get("status") or answer["code"]) for status, answer in self.answers]


@pytest.fixture(params=["postgres", "mariadb"])
def tgt(request: pytest.FixtureRequest) -> Iterator[str]:
    require_alias(request.param)
    with override_settings(
        CHANGEFEED_SYNC_TARGET_DATABASE=request.param, CHANGEFEED_SYNC_DELIVERY_BACKEND=LOOPBACK
    ):
        yield str(request.param)


@pytest.fixture
def webhook(tgt: str) -> Iterator[Webhook]:
    DataSource.objects.using(tgt).create(
        name="hq", url="http://source.invalid/sync/", client_name="regional", secrets="pw"
    )
    Target.objects.create(
        name="regional", secrets="pw", webhook_url="http://target.invalid/sync/webhook/hq/"
    )
    push.forget_targets()
    received = Webhook()
    loopback.connect("regional", received)
    yield received
    loopback.disconnect("regional")


def test_the_backend_is_a_delivery_backend(webhook: Webhook) -> None:
    chosen = push.backend()
    assert isinstance(chosen, loopback.LoopbackBackend)
    assert isinstance(chosen, DeliveryBackend)
    assert chosen.configuration_problems() == []


def test_a_write_arrives_applied_on_the_target(webhook: Webhook, tgt: str) -> None:
    fr = Country.objects.create(code="fr")
    language = Language.objects.create(country=fr, code="fr")
    Copy.objects.create(language=language, key="hello", value="Bonjour")
    # Delivered in the committing thread: there when the save returned.
    assert Copy.objects.using(tgt).get(key="hello").value == "Bonjour"
    Copy.objects.filter(key="hello").update(value="Salut")
    assert Copy.objects.using(tgt).get(key="hello").value == "Salut"
    assert state(tgt) == state("default")
    head = feed.head("default")
    assert DataSource.objects.using(tgt).get().checkpoint == head
    target = Target.objects.get()
    assert (target.delivered_seq, target.failures, target.last_error) == (head, 0, "")
    assert webhook.statuses() == [(200, "applied")] * 4


def test_a_bad_signature_is_refused_and_recorded(webhook: Webhook, tgt: str) -> None:
    Target.objects.update(secrets="not-the-targets")
    Country.objects.create(code="fr")
    assert webhook.statuses() == [(403, "authentication_failed")]
    assert not Country.objects.using(tgt).exists()
    assert DataSource.objects.using(tgt).get().checkpoint == 0
    target = Target.objects.get()
    assert target.delivered_seq == 0 and target.failures == 1
    assert "HTTP 403" in target.last_error and target.next_attempt_at is not None
    # In its backoff: the next commit sends nothing.
    Country.objects.create(code="de")
    assert len(webhook.answers) == 1


def test_nothing_is_delivered_twice(webhook: Webhook, tgt: str) -> None:
    Target.objects.update(paused=True)  # a backlog, then one delivery of all of it
    push.forget_targets()
    Country.objects.bulk_create(Country(code=f"{c}{c}", name="x" * 90) for c in "abcdefgh")
    with override_settings(CHANGEFEED_SYNC_DELIVERY_MAX_BYTES=700):
        Target.objects.update(paused=False)
        push.forget_targets()
        Country.objects.create(code="zz")  # this commit sends the backlog with it
        assert len(webhook.bodies) > 2  # in several batches under the size limit
        Country.objects.filter(code="aa").update(name="y")
        push.retry_now(Target.objects.all())  # nothing new: nothing sent
    spans = [(body["since"], body["last_seq"]) for body in webhook.bodies]
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans  # end to end
    seqs = [event["seq"] for body in webhook.bodies for event in body["events"]]
    assert len(seqs) == len(set(seqs)) == Country.objects.count() + 1  # 9 creates, 1 update
    assert webhook.statuses() == [(200, "applied")] * len(webhook.bodies)  # no duplicate
    assert Target.objects.get().delivered_seq == feed.head("default")
    assert state(tgt) == state("default")
