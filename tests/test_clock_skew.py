"""Two sites' clocks differ: up to CLOCK_SKEW seconds either way is accepted on every
endpoint and on webhooks; tokens further in the past or the future are still refused,
and a replayed token is refused for as long as it is accepted (issue 11, item 2)."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from django.test import Client

from changefeed_sync import conf
from changefeed_sync.models import DataSource, Nonce, Target
from changefeed_sync.signing import CLOCK_SKEW, sign_request
from changefeed_sync.source import push
from changefeed_sync.target.follow import sync
from tests.dbs import require_alias
from tests.helpers import signer_clock, state
from tests.test_push import sites, tgt  # noqa: F401 - fixtures
from tests.testapp.models import Country

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SECRET = "clock-skew-test-secret"
FEED = "/sync/feed/"


@pytest.fixture
def target() -> Target:
    return Target.objects.create(name="tgt", secrets=SECRET)


def _feed(offset: float, path: str = FEED) -> tuple[int, str]:
    with signer_clock(offset):
        header = sign_request("tgt", [SECRET], "GET", path)
    return Client().get(path, HTTP_AUTHORIZATION=header).status_code, header


@pytest.mark.parametrize(
    "offset",
    [1, 2, CLOCK_SKEW - 2, -(CLOCK_SKEW - 2)],
    ids=["1s-ahead", "2s-ahead", "skew-ahead", "skew-behind"],
)
def test_feed_accepts_a_signer_whose_clock_differs(target: Target, offset: float) -> None:
    assert _feed(offset)[0] == 200


def test_feed_accepts_an_old_token_within_its_age_plus_the_skew(target: Target) -> None:
    assert _feed(-(conf.signature_max_age() + CLOCK_SKEW - 2))[0] == 200


@pytest.mark.parametrize("when", ["ahead", "hour-ahead", "old"])
def test_feed_refuses_tokens_far_in_the_future_or_the_past(target: Target, when: str) -> None:
    offset = {
        "ahead": CLOCK_SKEW + 3,
        "hour-ahead": 3600,
        "old": -(conf.signature_max_age() + CLOCK_SKEW + 3),
    }[when]
    assert _feed(offset)[0] == 403


def test_a_future_dated_token_cannot_be_replayed_while_it_is_accepted(target: Target) -> None:
    status, header = _feed(CLOCK_SKEW - 2)
    assert status == 200
    # Its nonce is kept for every moment the token is accepted at: issued up to
    # CLOCK_SKEW ahead, accepted until max age + CLOCK_SKEW after that.
    nonce = Nonce.objects.get()
    from django.utils import timezone

    kept_for = (nonce.expires_at - timezone.now()).total_seconds()
    assert kept_for >= conf.signature_max_age() + 2 * CLOCK_SKEW - 2
    assert Client().get(FEED, HTTP_AUTHORIZATION=header).status_code in (403, 409)


def test_webhook_accepts_a_sender_ahead_and_refuses_one_far_ahead(
    sites: tuple[Target, DataSource],  # noqa: F811
    tgt: str,  # noqa: F811
) -> None:
    target, _ = sites
    Target.objects.filter(pk=target.pk).update(paused=True)
    push.forget_targets()
    Country.objects.create(code="sk")
    target.refresh_from_db()
    batch = next(push.batches(target, "default"))
    url = target.webhook_url
    with signer_clock(conf.webhook_tolerance() + CLOCK_SKEW + 5):
        far = push.signed_headers(batch)
    assert requests.post(url, data=batch.body, headers=far, timeout=10).status_code == 403
    assert not Country.objects.using(tgt).exists()
    with signer_clock(30):
        ahead = push.signed_headers(batch)
    answer = requests.post(url, data=batch.body, headers=ahead, timeout=10)
    assert answer.status_code == 200, answer.text
    assert Country.objects.using(tgt).filter(code="sk").exists()


def test_a_follower_one_second_ahead_syncs(live_server: Any) -> None:
    alias = "postgres"
    require_alias(alias)
    Target.objects.create(name="regional", secrets=SECRET)
    Country.objects.create(code="ah")
    ds = DataSource.objects.using(alias).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets=SECRET
    )
    with signer_clock(1.0):
        result = sync(ds, using=alias)
    assert result.stats.events == 1
    assert state(alias) == state("default")
