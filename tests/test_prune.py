"""Outbox retention: pruned cursors get a clear 'cursor expired', never a silent skip."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from changefeed_sync.exceptions import CursorExpired
from changefeed_sync.models import Event, Target
from changefeed_sync.signing import sign_request
from changefeed_sync.source.feed import head, read
from tests.testapp.models import Country

pytestmark = pytest.mark.django_db(transaction=True)


def test_prune_drops_old_events_and_expires_old_cursors() -> None:
    for code in ("aa", "bb", "cc"):
        Country.objects.create(code=code)
    head("default")  # every event has its position
    ids = list(Event.objects.order_by("position").values_list("position", flat=True))
    Event.objects.filter(position__in=ids[:2]).update(
        created_at=timezone.now() - timedelta(days=40)
    )
    call_command("changefeed_prune", "--days", "30")
    assert list(Event.objects.order_by("position").values_list("position", flat=True)) == ids[2:]
    with pytest.raises(CursorExpired, match="full Data Pull"):
        read(0, 10, using="default")
    # A target that had read through the pruned events carries on.
    assert [e["key"] for e in read(ids[1], 10, using="default").events] == [["cc"]]
    Target.objects.create(name="t", secrets="k")
    path = "/sync/feed/?since=0"
    r = Client().get(path, HTTP_AUTHORIZATION=sign_request("t", ["k"], "GET", path))
    assert r.status_code == 410 and r.json()["code"] == "cursor_expired"
