"""The feed endpoint: authentication, cursor paging, long-poll, errors."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.test import Client

from changefeed_sync import conf
from changefeed_sync.models import Target
from changefeed_sync.signing import CLOCK_SKEW, sign_request
from tests.helpers import signer_clock
from tests.testapp.models import Country

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/sync/feed/"


def _get(client: Client, path: str, secrets: list[str] | None = None, name: str = "tgt",
         header: str | None = None) -> Any:
    if header is None and secrets is not None:
        header = sign_request(name, secrets, "GET", path)
    extra = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    return client.get(path, **extra)


@pytest.fixture
def target() -> Target:
    return Target.objects.create(name="tgt", secrets="old-secret\nnew-secret")


def test_pages_follow_the_cursor(target: Target) -> None:
    client = Client()
    for i in range(5):
        Country.objects.create(code=f"c{i}")
    r = _get(client, f"{URL}?since=0&limit=2", ["new-secret"])
    assert r.status_code == 200
    body = r.json()
    assert body["protocol"] == 1
    assert [e["key"] for e in body["events"]] == [["c0"], ["c1"]]
    assert body["more"] is True and body["pending"] == 3
    r = _get(client, f"{URL}?since={body['last_seq']}&limit=10", ["new-secret"])
    body = r.json()
    assert [e["key"] for e in body["events"]] == [["c2"], ["c3"], ["c4"]]
    assert body["more"] is False and body["pending"] == 0
    Country.objects.get(code="c4").delete()
    r = _get(client, f"{URL}?since={body['last_seq']}", ["new-secret"])
    tomb = r.json()["events"]
    assert [(e["op"], e["key"], e["data"]) for e in tomb] == [("delete", ["c4"], None)]
    target.refresh_from_db()
    assert target.last_seen_seq == body["last_seq"]


def test_rotated_keys_are_all_accepted(target: Target) -> None:
    client = Client()
    assert _get(client, URL, ["old-secret"]).status_code == 200
    assert _get(client, URL, ["new-secret"]).status_code == 200
    assert _get(client, URL, ["wrong"]).status_code == 403


@pytest.mark.parametrize(
    "header, status",
    [
        (None, 401),
        ("Bearer abc", 403),
        ("Changefeed tgt not-a-token", 403),
        ("Changefeed", 403),
    ],
)
def test_bad_credentials_reveal_nothing(target: Target, header: str | None, status: int) -> None:
    r = Client().get(URL, **({"HTTP_AUTHORIZATION": header} if header else {}))
    assert r.status_code == status
    assert set(r.json()) == {"protocol", "error", "code"}
    assert r.json()["code"] == {401: "authentication_required", 403: "authentication_failed"}[status]
    assert "secret" not in r.content.decode()
    if status == 401:
        assert r["WWW-Authenticate"] == "Changefeed"


def test_unknown_target_and_inactive_target_are_refused(target: Target) -> None:
    client = Client()
    assert _get(client, URL, ["new-secret"], name="stranger").status_code == 403
    target.active = False
    target.save()
    assert _get(client, URL, ["new-secret"]).status_code == 403


def test_replay_is_refused(target: Target) -> None:
    client = Client()
    header = sign_request("tgt", ["new-secret"], "GET", URL)
    assert _get(client, URL, header=header).status_code == 200
    assert _get(client, URL, header=header).status_code == 403


def test_token_for_another_request_is_refused(target: Target) -> None:
    header = sign_request("tgt", ["new-secret"], "GET", f"{URL}?since=5")
    assert _get(Client(), f"{URL}?since=0", header=header).status_code == 403


def test_expired_signature_is_refused(target: Target) -> None:
    # Older than the maximum age plus the clock skew allowed.
    with signer_clock(-(conf.signature_max_age() + CLOCK_SKEW + 2)):
        header = sign_request("tgt", ["new-secret"], "GET", URL)
    assert _get(Client(), URL, header=header).status_code == 403


@pytest.mark.parametrize("query", ["since=x", "limit=0", "since=-1", "wait=abc"])
def test_bad_parameters_get_400(target: Target, query: str) -> None:
    r = _get(Client(), f"{URL}?{query}", ["new-secret"])
    assert r.status_code == 400
    assert r.json()["error"]


def test_long_poll_returns_when_an_event_commits(target: Target) -> None:
    client = Client()
    def later() -> None:
        time.sleep(0.3)
        Country.objects.create(code="lp")
        from django.db import connection
        connection.close()

    thread = threading.Thread(target=later)
    start = time.monotonic()
    thread.start()
    r = _get(client, f"{URL}?since=0&wait=5", ["new-secret"])
    elapsed = time.monotonic() - start
    thread.join()
    assert [e["key"] for e in r.json()["events"]] == [["lp"]]
    assert 0.25 < elapsed < 2.0


def test_long_poll_times_out_empty(target: Target) -> None:
    start = time.monotonic()
    r = _get(Client(), f"{URL}?since=0&wait=0.3", ["new-secret"])
    assert r.json()["events"] == [] and r.json()["last_seq"] == 0
    assert time.monotonic() - start >= 0.3


def test_a_target_limited_to_some_models_reads_only_theirs(target: Target) -> None:
    """Target.model_labels (the admin's "models" of a target) filters its feed."""
    from tests.testapp.models import Tag

    Country.objects.create(code="aa")
    Tag.objects.create(slug="red")
    Country.objects.create(code="bb")
    client = Client()
    everything = _get(client, f"{URL}?since=0", ["new-secret"]).json()["events"]
    assert [e["model"] for e in everything] == ["testapp.country", "testapp.tag", "testapp.country"]
    Target.objects.filter(pk=target.pk).update(model_labels=["testapp.tag"])
    only = _get(client, f"{URL}?since=0", ["new-secret"]).json()
    assert [(e["model"], e["key"]) for e in only["events"]] == [("testapp.tag", ["red"])]
