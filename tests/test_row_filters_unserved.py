"""Issue 14: what a filtered Target is answered before it can follow the feed.

It starts with a Data Pull of the rows inside its filters (snapshot/, files/:
tests/test_row_filters_pull.py); its feed, long-poll and stream ask a checkpoint from
before its filters took effect for one (410 ``filter_changed``), and answer a Target
whose saved filters are invalid 409 ``row_filters_invalid``: never events of rows
outside its filters. Through real HTTP (a live server: this process's SQLite
"default" as the source); the feed itself: tests/test_row_filters_feed.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from changefeed_sync.models import Target
from changefeed_sync.source import push
from tests.test_restriction import SECRET, Endpoint
from tests.testapp.models import Country

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(120),
]

FILTERS = {
    "testapp.country": {"code__in": ["fr"]},
    "testapp.language": {"country__code__in": ["fr"]},  # through a foreign key
}


@pytest.fixture
def filtered(live_server: Any) -> tuple[Endpoint, Endpoint]:
    """(a Target with row filters, the same Target without)."""
    Target.objects.create(name="regional", secrets=SECRET, row_filters=FILTERS)
    Target.objects.create(name="everything", secrets=SECRET)
    Country.objects.create(code="fr", name="France")
    Country.objects.create(code="de", name="Germany")
    return Endpoint(live_server.url, "regional"), Endpoint(live_server.url, "everything")


def _asked_for_a_pull(answer: requests.Response) -> None:
    assert answer.status_code == 410, answer.text
    body = answer.json()
    assert body["code"] == "filter_changed"
    assert "'regional'" in body["error"] and "run a full Data Pull" in body["error"]
    assert "Germany" not in answer.text and "France" not in answer.text


def test_a_new_filtered_target_is_asked_for_a_data_pull_first(
    filtered: tuple[Endpoint, Endpoint],
) -> None:
    regional, everything = filtered
    _asked_for_a_pull(regional.get("feed/", since=0))
    _asked_for_a_pull(regional.get("feed/", since=0, wait=1))
    _asked_for_a_pull(regional.get("feed/", since=0, stream=1, wait=1))
    # The same request of an unfiltered Target is answered.
    page = everything.get("feed/", since=0)
    assert page.status_code == 200
    assert {e["key"][0] for e in page.json()["events"]} == {"fr", "de"}
    # From where its pull starts, it follows.
    start = regional.get("snapshot/").json()["position"]
    followed = regional.get("feed/", since=start)
    assert followed.status_code == 200 and followed.json()["events"] == []


def test_snapshot_and_files_serve_a_filtered_target_its_rows(
    filtered: tuple[Endpoint, Endpoint],
) -> None:
    regional, everything = filtered
    start = regional.get("snapshot/")
    assert start.status_code == 200, start.text
    assert start.json()["counts"]["testapp.country"] == 1
    assert everything.get("snapshot/").json()["counts"]["testapp.country"] == 2
    page = regional.get("snapshot/", model="testapp.country")
    assert page.status_code == 200, page.text
    assert [row["key"] for row in page.json()["rows"]] == [["fr"]]
    assert "Germany" not in page.text
    forged = regional.get("files/", t="x")
    assert forged.status_code == 403 and forged.json()["code"] == "bad_file_token"
    described = regional.post("files/", json.dumps({"protocol": 1, "files": []}).encode())
    assert described.status_code == 200 and described.json()["files"] == []


def test_invalid_saved_filters_get_nothing(filtered: tuple[Endpoint, Endpoint]) -> None:
    """Filters saved past Target.clean() (E011) are not read as "no filter"."""
    regional, _ = filtered
    Target.objects.filter(name="regional").update(row_filters={"testapp.country": {"nope": 1}})
    for answer in (
        regional.get("snapshot/"),
        regional.get("snapshot/", model="testapp.country"),
        regional.get("files/", t="x"),
    ):
        assert answer.status_code == 409, answer.text
        assert answer.json()["code"] == "row_filters_invalid"
        assert "'nope'" in answer.json()["error"] and "France" not in answer.text
    assert regional.get("feed/", since=0).json()["code"] == "row_filters_invalid"
    assert regional.get("feed/", since=0, stream=1, wait=1).json()["code"] == "row_filters_invalid"


def test_clearing_the_filters_asks_for_a_data_pull_too(
    filtered: tuple[Endpoint, Endpoint],
) -> None:
    """Its rows were a part of the source's: only a pull gives it the rest."""
    regional, _ = filtered
    start = regional.get("snapshot/").json()["position"]
    assert regional.get("feed/", since=start).status_code == 200
    Target.objects.filter(name="regional").update(row_filters={})
    Country.objects.create(code="it")
    _asked_for_a_pull(regional.get("feed/", since=start))
    again = regional.get("snapshot/").json()["position"]
    assert regional.get("feed/", since=again).status_code == 200


def test_a_target_with_invalid_filters_gets_no_push(live_server: Any) -> None:
    hook = f"{live_server.url}/sync/webhook/hq/"
    filtered = Target.objects.create(
        name="regional", secrets=SECRET, webhook_url=hook, row_filters=FILTERS
    )
    broken = Target.objects.create(name="broken", secrets=SECRET, webhook_url=hook)
    Target.objects.filter(pk=broken.pk).update(row_filters={"testapp.country": {"nope": 1}})
    broken.refresh_from_db()
    plain = Target.objects.create(name="everything", secrets=SECRET, webhook_url=hook)
    push.forget_targets()
    assert sorted(push.push_target_ids("default")) == sorted([plain.pk, filtered.pk])
    assert not push.takes_deliveries(broken)
    assert push.deliver_pending(broken.pk, "default") is None  # nothing sent, no retry
    broken.refresh_from_db()
    assert broken.delivered_seq == 0 and broken.failures == 0
