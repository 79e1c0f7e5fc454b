"""Deliver through Google Cloud Tasks: one HTTP-target task per batch.

Cloud Tasks POSTs each task to the target's webhook URL with an OIDC token of
``CHANGEFEED_SYNC_CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL`` and retries on its own
schedule (the queue's RetryConfig). Task names derive from the batch
(``<target>-<since>-<last_seq>``), so enqueueing the same batch twice is
deduplicated by Cloud Tasks. Used only when configured, never by sniffing
the environment. Needs ``pip install changefeed-sync[cloudtasks]``.

The tasks are created in the committing thread, after commit, before the
request (or command) that wrote goes on: when it returns, Cloud Tasks holds
them, so a process that exits right after a write loses nothing. With many
targets that is one feed read per position for all of them (``push.plan``),
one ``create_task`` per target and batch over the process's one client and
gRPC channel, several at a time (``CREATE_CONCURRENCY`` threads shared by the
process, the batches of one target in order), and one UPDATE of the Target rows
per page.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.cloud import tasks_v2

from ... import conf
from ...models import Target
from .. import push
from .base import DeliveryBackend

logger = logging.getLogger("changefeed_sync.push")

#: create_task calls in flight at once for one commit (targets in parallel). Each is a
#: round trip to Cloud Tasks: one after another, 100 targets held the writer ~100 times.
CREATE_CONCURRENCY = 8


def make_client() -> tasks_v2.CloudTasksClient:
    emulator = conf.cloud_tasks("EMULATOR_HOST")
    if emulator:
        import grpc
        from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

        channel = grpc.insecure_channel(emulator)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()


def _task_id(batch: push.Batch) -> str:
    # Task ids allow letters, digits, hyphens and underscores only.
    return re.sub(r"[^A-Za-z0-9_-]", "_", batch.id)[:500]


class CloudTasksBackend(DeliveryBackend):
    """Runs in Google Cloud Tasks (a task billed per batch): the committing thread waits
    for one create_task round trip per target and batch, then Cloud Tasks posts and retries."""

    def __init__(self) -> None:
        self._reset()
        _instances.add(self)

    def _reset(self) -> None:
        self._client: Any = None
        self._client_host: str | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @staticmethod
    def configuration_problems() -> list[str]:
        problems = []
        if not conf.cloud_tasks("PROJECT"):
            problems.append("Cloud Tasks delivery needs CHANGEFEED_SYNC_CLOUD_TASKS_PROJECT.")
        if not conf.cloud_tasks("QUEUE"):
            problems.append("Cloud Tasks delivery needs CHANGEFEED_SYNC_CLOUD_TASKS_QUEUE.")
        if not conf.cloud_tasks("SERVICE_ACCOUNT_EMAIL") and not conf.cloud_tasks("EMULATOR_HOST"):
            problems.append(
                "Cloud Tasks delivery needs CHANGEFEED_SYNC_CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL "
                "(the OIDC identity targets verify)."
            )
        return problems

    @property
    def client(self) -> Any:
        """One client, so one gRPC channel, per process (and emulator host)."""
        host = conf.cloud_tasks("EMULATOR_HOST")
        with self._lock:
            if self._client is None or self._client_host != host:
                self._client = make_client()
                self._client_host = host
            return self._client

    def queue_path(self) -> str:
        return str(
            self.client.queue_path(
                conf.cloud_tasks("PROJECT"), conf.cloud_tasks("LOCATION"), conf.cloud_tasks("QUEUE")
            )
        )

    def schedule(self, target_ids: list[int], using: str) -> None:
        """Enqueue every target's undelivered batches; return once Cloud Tasks has them."""
        targets = [
            t
            for t in Target.objects.using(using).filter(pk__in=target_ids)
            if push.takes_deliveries(t)
        ]
        parent = self.queue_path()
        while targets:
            plans = push.plan(targets, using)
            outcomes = self._create_all(list(plans.values()), parent)
            # ``delivered_seq`` means "enqueued" for this backend: one UPDATE for all.
            enqueued = {pk: last for pk, (last, _) in outcomes.items() if last is not None}
            push.record_successes(enqueued, using)
            targets = []
            for pk, (last, error) in outcomes.items():
                planned = plans[pk]
                if error is not None:
                    push.record_failure(planned.target, f"Cloud Tasks: {error}", using)
                elif planned.more and last is not None:
                    planned.target.delivered_seq = last
                    targets.append(planned.target)  # its next page, in the next round

    def _create_all(
        self, plans: list[push.Plan], parent: str
    ) -> dict[int, tuple[int | None, Exception | None]]:
        """Create the tasks of every plan, several targets at a time, each target's in
        order. Per target: the last position enqueued (None: none) and the error that
        stopped it, if any."""
        if len(plans) <= 1:
            return {p.target.pk: self._create_plan(p, parent) for p in plans}
        self.client  # noqa: B018 - created here, not raced for by the threads below
        try:
            executor = self._executor_pool()
            futures = {p.target.pk: executor.submit(self._create_plan, p, parent) for p in plans}
        except RuntimeError:
            # The interpreter is shutting down (a write in an atexit hook): no new threads.
            # A task submitted before that is refused by name the second time.
            return {p.target.pk: self._create_plan(p, parent) for p in plans}
        return {pk: future.result() for pk, future in futures.items()}

    def _executor_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    CREATE_CONCURRENCY, thread_name_prefix="changefeed-push-cloudtasks"
                )
            return self._executor

    def _create_plan(self, plan: push.Plan, parent: str) -> tuple[int | None, Exception | None]:
        last: int | None = None
        try:
            for batch in plan.batches:
                self.create(batch, parent)
                last = batch.last_seq
        except google_exceptions.GoogleAPIError as exc:
            return last, exc
        return last, None

    def create(self, batch: push.Batch, parent: str) -> bool:
        """Create the batch's task; False if Cloud Tasks had it already (by name)."""
        target = batch.target
        email = conf.cloud_tasks("SERVICE_ACCOUNT_EMAIL")
        http_request: dict[str, Any] = {
            "http_method": tasks_v2.HttpMethod.POST,
            "url": target.webhook_url,
            "headers": push.signed_headers(batch),
            "body": batch.body,
        }
        if email:
            http_request["oidc_token"] = {
                "service_account_email": email,
                "audience": target.webhook_url,
            }
        task = {"name": f"{parent}/tasks/{_task_id(batch)}", "http_request": http_request}
        try:
            self.client.create_task(parent=parent, task=task)
        except google_exceptions.AlreadyExists:
            return False  # enqueued before: Cloud Tasks deduplicates by name
        return True

    def enqueue_pending(self, target: Target, using: str) -> int:
        """Create a task per undelivered batch of one target, in order; ``delivered_seq``
        then means "enqueued". Returns the number of tasks created."""
        created = 0
        parent = self.queue_path()
        for batch in push.batches(target, using):
            created += self.create(batch, parent)
            push.record_success(target, batch.last_seq, using)
        return created


_instances: weakref.WeakSet[CloudTasksBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A gRPC channel and threads do not survive fork() (a server forking its workers
    # after a write): the child makes its own.
    for backend in list(_instances):
        backend._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
