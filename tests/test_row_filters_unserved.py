"""Issue 14 in progress: a Target with row filters is served a Data Pull of the rows
inside them (snapshot/, files/: tests/test_row_filters_pull.py), and the feed when its
filters read the models' own fields only (tests/test_row_filters_feed.py); with a filter
through a foreign key, feed/, its long-poll and its stream answer a 409 naming it, and
no push goes to a filtered Target yet: never events of rows outside its filters.
Through real HTTP (a live server: this process's SQLite "default" as the source)."""

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


def _refused(answer: requests.Response) -> None:
    assert answer.status_code == 409, answer.text
    body = answer.json()
    assert body["code"] == "row_filters_not_served"
    assert "'regional'" in body["error"] and "row_filters" in body["error"]
    assert "through a foreign key (testapp.language through country)" in body["error"]
    assert "the feed of a filtered Target is not served yet" in body["error"]
    assert "Germany" not in answer.text and "France" not in answer.text


def test_the_feed_refuses_a_filtered_target(filtered: tuple[Endpoint, Endpoint]) -> None:
    regional, everything = filtered
    _refused(regional.get("feed/", since=0))
    _refused(regional.get("feed/", since=0, wait=1))
    _refused(regional.get("feed/", since=0, stream=1, wait=1))
    # The same request of an unfiltered Target is answered.
    page = everything.get("feed/", since=0)
    assert page.status_code == 200
    assert {e["key"][0] for e in page.json()["events"]} == {"fr", "de"}


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


def test_clearing_the_filters_serves_the_feed_again(
    filtered: tuple[Endpoint, Endpoint],
) -> None:
    regional, _ = filtered
    _refused(regional.get("feed/", since=0))
    Target.objects.filter(name="regional").update(row_filters={})
    assert regional.get("feed/", since=0).status_code == 200


def test_a_filtered_target_gets_no_push(live_server: Any) -> None:
    hook = f"{live_server.url}/sync/webhook/hq/"
    filtered = Target.objects.create(
        name="regional", secrets=SECRET, webhook_url=hook, row_filters=FILTERS
    )
    plain = Target.objects.create(name="everything", secrets=SECRET, webhook_url=hook)
    push.forget_targets()
    assert push.push_target_ids("default") == [plain.pk]
    assert not push.takes_deliveries(filtered)
    assert push.deliver_pending(filtered.pk, "default") is None  # nothing sent, no retry
    filtered.refresh_from_db()
    assert filtered.delivered_seq == 0 and filtered.failures == 0
