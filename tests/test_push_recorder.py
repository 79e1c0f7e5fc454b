"""The inline pool records deliveries on the Target rows off the delivery path.

A slow row write (on SQLite: waiting for the write lock that a busy source's own
transactions hold) must not hold up the next delivery; the row still moves only to
positions the target acknowledged, a failure is never overwritten by a success
recorded late, and the successes of many targets go in one UPDATE.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.test import override_settings

from changefeed_sync.exceptions import DeliveryFailed
from changefeed_sync.models import Target
from changefeed_sync.source import push
from changefeed_sync.source.delivery.inline import SharedRecorder
from tests.testapp.models import Country

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(60),
]


class Hook:
    """Stands in for the target: records the batches posted, fails when told to."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.fail = False

    def __call__(self, batch: push.Batch, session: Any = None) -> None:
        if self.fail:
            raise DeliveryFailed("HTTP 503 (test)")
        self.spans.append((batch.since, batch.last_seq))


class SlowRow:
    """``record_successes`` that waits until released, like a write waiting for a lock."""

    def __init__(self, order: list[str]) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.order = order
        self.writes: list[dict[int, int]] = []
        self._record = push.record_successes

    def __call__(self, acknowledged: dict[int, int], using: str) -> None:
        self.entered.set()
        assert self.gate.wait(20), "never released"
        self._record(acknowledged, using)
        self.writes.append(dict(acknowledged))
        self.order.extend(f"success {seq}" for seq in acknowledged.values())


def _row(target: Target) -> Target:
    return Target.objects.get(pk=target.pk)


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 15
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Any:
    order: list[str] = []
    hook, slow = Hook(), SlowRow(order)
    record_failure = push.record_failure

    def failure(target: Target, message: str, using: str) -> float:
        delay = record_failure(target, message, using)
        order.append("failure")
        return delay

    monkeypatch.setattr(push, "post", hook)
    monkeypatch.setattr(push, "record_successes", slow)
    monkeypatch.setattr(push, "record_failure", failure)
    with override_settings(CHANGEFEED_SYNC_DELIVERY_BACKEND=None):  # we deliver by hand
        target = Target.objects.create(
            name="t", secrets="pw", webhook_url="http://127.0.0.1:9/sync/webhook/s/"
        )
        yield target, hook, slow, order
    slow.gate.set()


def test_deliveries_go_on_while_the_row_write_waits(setup: Any) -> None:
    target, hook, slow, order = setup
    recorder = SharedRecorder()
    Country.objects.create(code="aa")
    assert push.deliver_pending(target.pk, recorder=recorder) is None
    first = hook.spans[-1]
    assert first[0] == 0
    assert slow.entered.wait(10)  # the row write started and waits
    assert _row(target).delivered_seq == 0

    # More commits: delivered at once, after what was acknowledged (not resent).
    Country.objects.create(code="bb")
    Country.objects.create(code="cc")
    assert push.deliver_pending(target.pk, recorder=recorder) is None
    second = hook.spans[-1]
    assert second[0] == first[1] and second[1] > first[1]
    assert _row(target).delivered_seq == 0  # still waiting

    slow.gate.set()
    _wait(lambda: _row(target).delivered_seq == second[1], "the row to catch up")
    assert order[-1] == f"success {second[1]}"
    assert len(order) <= 2  # the second write covers every delivery made meanwhile
    row = _row(target)
    assert (row.failures, row.last_error, row.next_attempt_at) == (0, "", None)


def test_a_failure_is_written_after_the_success_before_it(setup: Any) -> None:
    target, hook, slow, order = setup
    recorder = SharedRecorder()
    Country.objects.create(code="aa")
    assert push.deliver_pending(target.pk, recorder=recorder) is None
    acked = hook.spans[-1][1]
    assert slow.entered.wait(10)

    Country.objects.create(code="bb")
    hook.fail = True
    threading.Timer(0.3, slow.gate.set).start()
    delay = push.deliver_pending(target.pk, recorder=recorder)
    assert delay is not None  # the backoff of a first failure
    assert order == [f"success {acked}", "failure"]
    row = _row(target)
    assert row.delivered_seq == acked
    assert row.failures == 1 and "HTTP 503" in row.last_error


def test_the_next_delivery_sees_what_the_row_does_not_show_yet(setup: Any) -> None:
    """A failure recorded, then a success whose write is late: the worker neither waits
    for the old backoff nor counts the old failures."""
    target, hook, slow, order = setup
    recorder = SharedRecorder()
    Country.objects.create(code="aa")
    hook.fail = True
    slow.gate.set()
    assert push.deliver_pending(target.pk, recorder=recorder) is not None
    assert _row(target).failures == 1
    Target.objects.filter(pk=target.pk).update(next_attempt_at=None)  # backoff over

    slow.gate.clear()
    slow.entered.clear()
    hook.fail = False
    assert push.deliver_pending(target.pk, recorder=recorder) is None
    assert slow.entered.wait(10)
    loaded = _row(target)
    assert loaded.failures == 1  # the row is behind
    recorder.loaded(loaded)
    assert (loaded.failures, loaded.next_attempt_at) == (0, None)
    assert loaded.delivered_seq == hook.spans[-1][1]
    slow.gate.set()
    _wait(lambda: _row(target).failures == 0, "the success to be written")


def test_many_targets_successes_are_one_write(setup: Any) -> None:
    """Successes of several targets acknowledged while a write waits: the next write
    covers all of them, each at its own position, in one statement."""
    target, hook, slow, order = setup
    others = [
        Target.objects.create(
            name=f"t{i}", secrets="pw", webhook_url="http://127.0.0.1:9/sync/webhook/s/"
        )
        for i in range(3)
    ]
    recorder = SharedRecorder()
    Country.objects.create(code="aa")
    assert push.deliver_pending(target.pk, recorder=recorder) is None
    assert slow.entered.wait(10)  # the first write waits
    Country.objects.create(code="bb")
    positions = {}
    for other in others:
        assert push.deliver_pending(other.pk, recorder=recorder) is None
        positions[other.pk] = hook.spans[-1][1]
        Country.objects.create(code=f"c{other.pk % 10}")  # each at its own position
    assert push.deliver_pending(target.pk, recorder=recorder) is None
    positions[target.pk] = hook.spans[-1][1]
    assert len(set(positions.values())) == 4

    slow.gate.set()
    _wait(lambda: all(_row(t).delivered_seq == positions[t.pk] for t in [target, *others]),
          "every row to catch up")
    assert len(slow.writes) == 2, slow.writes  # the first target's, then all four at once
    assert slow.writes[1] == positions
    for row in Target.objects.filter(pk__in=positions):
        assert (row.failures, row.last_error, row.next_attempt_at) == (0, "", None)
        assert row.last_delivery_at is not None
