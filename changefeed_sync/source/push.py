"""Source side of push: after a commit that wrote events, deliver them to targets.

The delivery backend (``CHANGEFEED_SYNC_DELIVERY_BACKEND``) decides where the
work runs: inline (a small pool of threads of this process, right after
commit), Cloud Tasks, or Django's task framework. What a delivery is lives
here and in delivery/batches.py: the events after the target's
``delivered_seq`` (only the models it receives), split so that no body
exceeds ``CHANGEFEED_SYNC_DELIVERY_MAX_BYTES``, each signed like a feed
request and POSTed to the target's webhook URL. The target applies a
batch only if it starts at its checkpoint, so duplicated, reordered or lost
deliveries all converge; the feed stays the source of truth. File contents
do not travel in the body: the target fetches them from this site's ``files/``
endpoint before applying (increment_files.py); a target that runs out of time
doing so answers 503 ``files_pending`` and the batch is sent again at once.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from django.db import transaction
from django.db.models import BigIntegerField, Case, F, Q, Value, When
from django.db.models.functions import Greatest
from django.utils import timezone
from django.utils.module_loading import import_string

from .. import conf
from ..cache import TtlCache
from ..exceptions import DeliveryFailed
from ..filters import is_filtered
from ..models import Target
from ..signing import ID_HEADER, SIGNATURE_HEADER, sign_request
from . import routes
from .delivery.base import DeliveryBackend

# Part of push's interface: the delivery backends plan and read batches through push.
from .delivery.batches import PAGE_EVENTS as PAGE_EVENTS
from .delivery.batches import Batch as Batch
from .delivery.batches import Chunk as Chunk
from .delivery.batches import Plan as Plan
from .delivery.batches import _body as _body
from .delivery.batches import batches as batches
from .delivery.batches import plan as plan

logger = logging.getLogger("changefeed_sync.push")


# ---------------------------------------------------------------- scheduling

# Per database alias; a second, so that a busy source does not query Targets after
# every commit.
_target_ids: TtlCache[str, list[int]] = TtlCache(1.0)


def push_target_ids(using: str) -> list[int]:
    """Targets that take deliveries (as of at most a second ago)."""

    def load() -> list[int]:
        found = (
            Target.objects.using(using)
            .filter(active=True, paused=False)
            .exclude(webhook_url="")
            .values_list("pk", "row_filters")
        )
        return [pk for pk, filters in found if not is_filtered(filters)] + [
            target.pk
            for target in Target.objects.using(using).filter(pk__in=[
                pk for pk, filters in found if is_filtered(filters)
            ])
            if not isinstance(routes.reading(target), str)
        ]  # fmt: skip

    return _target_ids.get(using, load)


def forget_targets() -> None:
    """Ask for the targets again at the next commit (one was changed)."""
    _target_ids.clear()


_backend: DeliveryBackend | None = None
_backend_path: str | None = None


def backend() -> DeliveryBackend | None:
    """This process's delivery backend (made on first use, and again when the setting
    changes); None when pushing is off."""
    global _backend, _backend_path
    path = conf.delivery_backend()
    if path is None:
        return None
    if _backend is None or _backend_path != path:
        # Backends are meant to subclass DeliveryBackend; one that only has the same
        # methods works as well (nothing checks its class).
        _backend = import_string(path)()
        _backend_path = path
    return _backend


def on_commit(using: str) -> None:
    """Schedule deliveries of events that just committed on ``using``."""
    chosen = backend()
    if chosen is None:
        return
    ids = push_target_ids(using)
    if ids:
        chosen.schedule(ids, using)


def on_events_committed(sender: Any, using: str, **kwargs: Any) -> None:
    """``events_committed`` receiver. The data is committed: a delivery problem
    is logged here, never raised into the writer."""
    try:
        on_commit(using)
    except Exception:
        logger.exception("scheduling deliveries failed")


def signed_headers(batch: Batch) -> dict[str, str]:
    url = urlsplit(batch.target.webhook_url)
    path = url.path + ("?" + url.query if url.query else "")
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign_request(
            batch.target.name, batch.target.secret_list(), "POST", path, batch.body
        ),
        ID_HEADER: batch.id,
    }


# ---------------------------------------------------------------- delivering


def record_success(target: Target, last_seq: int, using: str) -> None:
    # One statement (one commit): deliveries of other processes may be ahead.
    Target.objects.using(using).filter(pk=target.pk).update(
        delivered_seq=Greatest(F("delivered_seq"), Value(last_seq)),
        last_delivery_at=timezone.now(),
        failures=0,
        next_attempt_at=None,
        last_error="",
    )
    target.delivered_seq = max(target.delivered_seq, last_seq)
    target.failures = 0


def record_successes(acknowledged: dict[int, int], using: str) -> None:
    """``record_success`` for many targets in one statement: target id -> position.

    Targets of one round usually share a position, so the CASE is often one branch.
    """
    if not acknowledged:
        return
    by_seq: dict[int, list[int]] = {}
    for pk, seq in acknowledged.items():
        by_seq.setdefault(seq, []).append(pk)
    reached: Any
    if len(by_seq) == 1:
        reached = Value(next(iter(by_seq)))
    else:
        reached = Case(
            *[When(pk__in=pks, then=Value(seq)) for seq, pks in by_seq.items()],
            output_field=BigIntegerField(),
        )
    Target.objects.using(using).filter(pk__in=list(acknowledged)).update(
        delivered_seq=Greatest(F("delivered_seq"), reached),
        last_delivery_at=timezone.now(),
        failures=0,
        next_attempt_at=None,
        last_error="",
    )


def record_failure(target: Target, message: str, using: str) -> float:
    """Note a failed delivery; return seconds until the next attempt."""
    delays = conf.delivery_retry_delays()
    failures = target.failures + 1
    delay = delays[min(failures, len(delays) - 1)]
    Target.objects.using(using).filter(pk=target.pk).update(
        failures=failures,
        last_error=message[:2000],
        last_error_at=timezone.now(),
        next_attempt_at=timezone.now() + timedelta(seconds=delay),
    )
    target.failures = failures
    logger.warning(
        "delivery to %s failed (%d in a row): %s; next attempt in %.0f s",
        target.name,
        failures,
        message,
        delay,
    )
    return delay


def post(batch: Batch, session: requests.Session | None = None) -> None:
    """POST one batch; raise DeliveryFailed unless the target answered 2xx."""
    sender = session or requests
    # A kept-alive connection the target closed while idle fails when reused, before
    # any answer: sent once more on a new connection. (Not after a timeout: the target
    # may still be working on it.) Safe either way: a batch is idempotent.
    attempts = 2 if session is not None else 1
    while True:
        attempts -= 1
        try:
            response = sender.post(
                batch.target.webhook_url,
                data=batch.body,
                headers=signed_headers(batch),
                timeout=conf.delivery_timeout(),
            )
            break
        except requests.ConnectionError as exc:
            if attempts and not isinstance(exc, requests.Timeout):
                continue
            raise DeliveryFailed(f"{batch.target.webhook_url}: {exc}") from exc
        except requests.RequestException as exc:
            raise DeliveryFailed(f"{batch.target.webhook_url}: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise DeliveryFailed(
            f"{batch.target.webhook_url} answered HTTP {response.status_code}: "
            f"{response.text[:300]}",
            files_pending=response.status_code == 503 and _code(response) == "files_pending",
        )


def _code(response: requests.Response) -> Any:
    try:
        return response.json().get("code")
    except (ValueError, AttributeError):
        return None


#: Immediate re-sends of a batch whose target answered ``files_pending``.
FILES_PENDING_RESENDS = 10


class Recorder:
    """Where ``deliver_pending`` records outcomes: by default on the Target row, at once.

    A long-lived deliverer may record successes later, off the delivery path
    (``delivery.inline``); it then corrects each freshly read row with what it
    knows (``loaded``), so that it neither resends nor waits for nothing.
    """

    def loaded(self, target: Target) -> None:
        pass

    def success(self, target: Target, last_seq: int, using: str) -> None:
        record_success(target, last_seq, using)

    def failure(self, target: Target, message: str, using: str) -> float:
        return record_failure(target, message, using)


_RECORD_AT_ONCE = Recorder()


def deliver_pending(
    target_id: int,
    using: str = "default",
    session: requests.Session | None = None,
    recorder: Recorder = _RECORD_AT_ONCE,
) -> float | None:
    """Deliver everything pending for one target by HTTP, in order.

    Returns None when all was delivered (or nothing is due), else the seconds
    to wait before trying again.
    """
    target = Target.objects.using(using).filter(pk=target_id).first()
    if target is None or not takes_deliveries(target):
        return None
    recorder.loaded(target)
    wait = backoff_left(target)
    if wait is not None:
        return wait
    return deliver(target, batches(target, using), using, session, recorder)


def takes_deliveries(target: Target) -> bool:
    # Row filters the feed does not serve yet (through a foreign key, invalid): nothing
    # rather than rows outside them (routes.reading).
    return bool(
        target.active
        and not target.paused
        and target.webhook_url
        and not isinstance(routes.reading(target), str)
    )


def backoff_left(target: Target) -> float | None:
    """Seconds until ``target``'s next attempt is due, or None if it is due now."""
    if target.next_attempt_at is None:
        return None
    left = (target.next_attempt_at - timezone.now()).total_seconds()
    return float(left) if left > 0 else None


def deliver(
    target: Target,
    batches: Iterable[Batch],
    using: str,
    session: requests.Session | None = None,
    recorder: Recorder = _RECORD_AT_ONCE,
    *,
    send: Callable[[Batch], None] | None = None,
) -> float | None:
    """POST ``batches`` in order, each once it was acknowledged; stop at the first failure.

    ``send`` replaces the POST (raising DeliveryFailed as ``post`` does): the loopback
    backend hands batches to a receiver in this process.
    Returns None when all were delivered, else the seconds until the next attempt.
    """
    if send is None:
        send = functools.partial(post, session=session)
    for batch in batches:
        resends = FILES_PENDING_RESENDS
        while True:
            try:
                send(batch)
            except DeliveryFailed as exc:
                if exc.files_pending and resends > 0:
                    resends -= 1
                    continue
                return recorder.failure(target, str(exc), using)
            break
        recorder.success(target, batch.last_seq, using)
    return None


def retry_now(targets: Any, using: str = "default") -> None:
    """Clear the backoff of ``targets`` and schedule their deliveries."""
    ids = [t.pk for t in targets]
    Target.objects.using(using).filter(pk__in=ids).update(next_attempt_at=None)
    chosen = backend()
    if chosen is not None:
        transaction.on_commit(lambda: chosen.schedule(ids, using), using=using)


def due_targets(using: str) -> list[int]:
    """Targets with something undelivered whose backoff has passed."""
    now = timezone.now()
    return list(
        Target.objects.using(using)
        .filter(active=True, paused=False)
        .exclude(webhook_url="")
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .values_list("pk", flat=True)
    )


_resumed = threading.Event()


def resume_on_first_request(**kwargs: Any) -> None:
    """Once per process, when it starts serving: resume deliveries left pending by
    a process that stopped mid-delivery (otherwise only the next commit would)."""
    if _resumed.is_set():
        return
    _resumed.set()

    def run() -> None:
        from django.db import connections

        try:
            using = conf.feed_database()
            chosen = backend()
            due = due_targets(using)
            if chosen is not None and due:
                chosen.schedule(due, using)
        except Exception:
            logger.exception("resuming pending deliveries failed")
        finally:
            connections.close_all()

    threading.Thread(target=run, name="changefeed-push-resume", daemon=True).start()
