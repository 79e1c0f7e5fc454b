"""Push: signed webhooks delivered inline after commit, applied if they continue the checkpoint.

The live server thread plays both sites: its "default" database is the
source (feed, deliveries) and the webhook applies into another alias
(CHANGEFEED_SYNC_TARGET_DATABASE), a real PostgreSQL or MariaDB database.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from django.test import override_settings

from changefeed_sync import conf
from changefeed_sync.models import DataSource, Target
from changefeed_sync.signing import CLOCK_SKEW, SIGNATURE_HEADER, sign_request
from changefeed_sync.source import push
from tests.dbs import require_alias
from tests.helpers import signer_clock, state
from tests.testapp.models import Copy, Country, Language

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(params=["postgres", "mariadb"])
def tgt(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    require_alias(request.param)
    with override_settings(CHANGEFEED_SYNC_TARGET_DATABASE=request.param):
        yield str(request.param)


@pytest.fixture
def sites(live_server, tgt: str) -> tuple[Target, DataSource]:  # type: ignore[no-untyped-def]
    source = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets="pw"
    )
    target = Target.objects.create(
        name="regional", secrets="pw", webhook_url=live_server.url + "/sync/webhook/hq/"
    )
    push.forget_targets()
    return target, source


def _wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail("condition not met in time")


def test_changes_are_pushed_after_commit(sites: tuple[Target, DataSource], tgt: str) -> None:
    target, source = sites
    fr = Country.objects.create(code="fr")
    lang = Language.objects.create(country=fr, code="fr")
    Copy.objects.create(language=lang, key="hello", value="Bonjour")
    _wait_for(lambda: Copy.objects.using(tgt).filter(key="hello").exists())
    Copy.objects.filter(key="hello").update(value="Salut")
    _wait_for(lambda: Copy.objects.using(tgt).filter(value="Salut").exists())
    assert state(tgt) == state("default")
    checkpoint = DataSource.objects.using(tgt).get().checkpoint
    # The row is written once the target answered, off the delivery path.
    _wait_for(lambda: Target.objects.get(pk=target.pk).delivered_seq == checkpoint)


def test_duplicate_reordered_and_lost_deliveries_converge(
    sites: tuple[Target, DataSource], tgt: str
) -> None:
    target, source = sites
    Target.objects.filter(pk=target.pk).update(paused=True)  # deliver by hand below
    push.forget_targets()
    for code in ("aa", "bb", "cc", "dd"):
        Country.objects.create(code=code)
    target.refresh_from_db()
    batches = list(push.batches(target, "default", max_events=1))
    assert len(batches) == 4
    url = target.webhook_url

    def send(batch: push.Batch) -> requests.Response:
        return requests.post(url, data=batch.body, headers=push.signed_headers(batch), timeout=10)

    assert send(batches[1]).json()["status"] == "caught_up"  # gap: pulled the feed instead
    assert Country.objects.using(tgt).count() == 4
    assert send(batches[0]).json()["status"] == "duplicate"
    assert send(batches[3]).json()["status"] == "duplicate"
    assert state(tgt) == state("default")


def test_bad_webhooks_get_4xx_and_write_nothing(sites: tuple[Target, DataSource], tgt: str) -> None:
    target, source = sites
    Target.objects.filter(pk=target.pk).update(paused=True)
    push.forget_targets()
    Country.objects.create(code="aa")
    target.refresh_from_db()
    batch = next(push.batches(target, "default"))
    url = target.webhook_url
    path = "/sync/webhook/hq/"
    good = push.signed_headers(batch)

    def post(body: bytes, headers: dict[str, str], to: str = url) -> requests.Response:
        return requests.post(to, data=body, headers=headers, timeout=10)

    assert post(batch.body, {}).status_code == 401
    wrong = {SIGNATURE_HEADER: sign_request("regional", ["nope"], "POST", path, batch.body)}
    assert post(batch.body, wrong).status_code == 403
    assert post(batch.body + b" ", good).status_code == 403  # body changed after signing
    other = {SIGNATURE_HEADER: sign_request("other", ["pw"], "POST", path, batch.body)}
    assert post(batch.body, other).status_code == 403
    # An unknown source gets the answer of bad credentials: nothing tells the names.
    unknown = post(batch.body, good, to=url.replace("/hq/", "/nosuch/"))
    assert (unknown.status_code, unknown.json()["code"]) == (403, "authentication_failed")
    assert post(batch.body, {}, to=url.replace("/hq/", "/nosuch/")).status_code == 401
    junk = b"{not json"
    assert post(junk, {SIGNATURE_HEADER: sign_request("regional", ["pw"], "POST", path, junk)}).status_code == 400
    big = json.dumps({"pad": "x" * 1_100_000}).encode()
    assert post(big, {SIGNATURE_HEADER: sign_request("regional", ["pw"], "POST", path, big)}).status_code == 413
    with signer_clock(-(conf.webhook_tolerance() + CLOCK_SKEW + 2)):
        expired = push.signed_headers(batch)
    assert post(batch.body, expired).status_code == 403
    assert Country.objects.using(tgt).count() == 0
    fresh = push.signed_headers(batch)
    assert post(batch.body, fresh).json()["status"] == "applied"
    # The identical request again: its batch is applied, so it is acknowledged
    # (Cloud Tasks retries exactly so when an answer was lost) and writes nothing.
    assert post(batch.body, fresh).json()["status"] == "duplicate"
    # Replayed when its batch is not applied (checkpoint rewound): refused.
    DataSource.objects.using(tgt).filter(pk=source.pk).update(checkpoint=0)
    replay = post(batch.body, fresh)
    assert replay.status_code == 409 and "replayed" in replay.json()["error"]
    assert Country.objects.using(tgt).count() == 1


def test_target_down_then_back(sites: tuple[Target, DataSource], tgt: str, live_server) -> None:  # type: ignore[no-untyped-def]
    target, source = sites
    Target.objects.filter(pk=target.pk).update(webhook_url="http://127.0.0.1:9/sync/webhook/hq/")
    push.forget_targets()
    with override_settings(CHANGEFEED_SYNC_DELIVERY_RETRY_DELAYS=[0, 0.2, 0.2]):
        Country.objects.create(code="zz")
        _wait_for(lambda: Target.objects.get(pk=target.pk).failures >= 1)
        target.refresh_from_db()
        assert "127.0.0.1:9" in target.last_error
        Target.objects.filter(pk=target.pk).update(webhook_url=live_server.url + "/sync/webhook/hq/")
        _wait_for(lambda: Country.objects.using(tgt).filter(code="zz").exists())
    # The source records the success right after the target answered.
    _wait_for(lambda: Target.objects.get(pk=target.pk).failures == 0)
    assert Target.objects.get(pk=target.pk).last_error == ""


def test_model_selection_limits_what_a_target_receives(
    sites: tuple[Target, DataSource], tgt: str
) -> None:
    target, source = sites
    Target.objects.filter(pk=target.pk).update(model_labels=["testapp.country"])
    push.forget_targets()
    fr = Country.objects.create(code="fr")
    Language.objects.create(country=fr, code="fr")
    Country.objects.create(code="de")
    _wait_for(lambda: Country.objects.using(tgt).filter(code="de").exists())
    assert Language.objects.using(tgt).count() == 0


def test_a_webhook_whose_content_length_is_no_number_gets_400(  # type: ignore[no-untyped-def]
    sites: tuple[Target, DataSource], tgt: str, live_server
) -> None:
    """Issue 11, item 4, through a real server: ``Content-Length: abc`` was a 500."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(live_server.url)
    body = b'{"protocol": 1}'
    signature = sign_request("regional", ["pw"], "POST", "/sync/webhook/hq/", body)
    request = (
        b"POST /sync/webhook/hq/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: abc\r\nConnection: close\r\n"
        + f"{SIGNATURE_HEADER}: {signature}\r\n\r\n".encode()
        + body
    )
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(content)["code"] == "bad_content_length"
    assert DataSource.objects.using(tgt).get().checkpoint == 0
