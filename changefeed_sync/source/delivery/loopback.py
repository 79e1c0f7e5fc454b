"""Deliver to receivers in this very process, for tests: no network, no thread.

``CHANGEFEED_SYNC_DELIVERY_BACKEND = "changefeed_sync.source.delivery.loopback.LoopbackBackend"``,
then ``connect(target_name, receive)`` for each target. The batches are the ones the
inline backend would send (``batches.plan``: the same pages, bodies and signed headers),
and the outcomes are recorded on the Target rows as push records them (``delivered_seq``
on success, failures and backoff otherwise); only the POST is replaced by a call of
``receive(url, body, headers)``, which answers what the target's webhook would: an
HTTP status and its JSON document.

The source side must not import the target's: a test connects a receiver that hands
the request to the target site's webhook view (through Django's test client, say), so
a delivery is signed, verified and applied as over HTTP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ...exceptions import DeliveryFailed
from ...models import Target
from .. import push
from .base import DeliveryBackend
from .batches import Batch, plan

logger = logging.getLogger("changefeed_sync.push")

#: ``receive(url, body, headers) -> (HTTP status, JSON answer)``: a target's webhook.
Receiver = Callable[[str, bytes, Mapping[str, str]], tuple[int, Mapping[str, Any]]]

_receivers: dict[str, Receiver] = {}


def connect(target_name: str, receive: Receiver) -> None:
    """Deliver the batches of the Target named ``target_name`` to ``receive``."""
    _receivers[target_name] = receive


def disconnect(target_name: str) -> None:
    _receivers.pop(target_name, None)


class LoopbackBackend(DeliveryBackend):
    """Tests: runs in the committing thread, each batch one function call to a receiver
    connected in this process; the writer waits for every delivery."""

    def __init__(self) -> None:
        # One schedule at a time, each reading the Target rows the one before updated:
        # schedules of other threads (a server resuming deliveries on its first request,
        # which the receiver's request may be) then send nothing twice. Reentrant: a
        # receiver's own commit may schedule deliveries of its database.
        self._lock = threading.RLock()

    def schedule(self, target_ids: list[int], using: str) -> None:
        with self._lock:
            self._deliver(target_ids, using)

    def _deliver(self, target_ids: list[int], using: str) -> None:
        targets = [
            t
            for t in Target.objects.using(using).filter(pk__in=target_ids)
            if push.takes_deliveries(t) and push.backoff_left(t) is None
        ]
        while targets:
            plans = plan(targets, using)
            targets = []
            for planned in plans.values():
                retry_in = push.deliver(planned.target, planned.batches, using, send=_hand_over)
                if retry_in is None and planned.more:
                    targets.append(planned.target)  # its next page, in the next round


def _hand_over(batch: Batch) -> None:
    """``push.post`` to a connected receiver: DeliveryFailed unless it answered 2xx."""
    url = batch.target.webhook_url
    receive = _receivers.get(batch.target.name)
    if receive is None:
        raise DeliveryFailed(f"{url}: no receiver connected for {batch.target.name!r}")
    try:
        status, answer = receive(url, batch.body, push.signed_headers(batch))
    except Exception as exc:
        # What a server answers 500 for: a failed delivery, retried after the backoff.
        logger.exception("loopback receiver of %s failed", batch.target.name)
        raise DeliveryFailed(f"{url}: the receiver raised {exc!r}") from exc
    if not 200 <= status < 300:
        raise DeliveryFailed(
            f"{url} answered HTTP {status}: {dict(answer)!r:.300}",
            files_pending=status == 503 and answer.get("code") == "files_pending",
        )
