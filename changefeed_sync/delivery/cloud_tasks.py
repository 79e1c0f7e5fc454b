"""Deliver through Google Cloud Tasks: one HTTP-target task per batch.

Cloud Tasks POSTs each task to the target's webhook URL with an OIDC token of
``CHANGEFEED_SYNC_CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL`` and retries on its own
schedule (the queue's RetryConfig). Task names derive from the batch
(``<target>-<since>-<last_seq>``), so enqueueing the same batch twice is
deduplicated by Cloud Tasks. Used only when configured, never by sniffing
the environment. Needs ``pip install changefeed-sync[cloudtasks]``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.cloud import tasks_v2

from .. import conf, push
from ..models import Target

logger = logging.getLogger("changefeed_sync.push")


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


class CloudTasksBackend:
    def __init__(self) -> None:
        self._client: Any = None

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
        if self._client is None:
            self._client = make_client()
        return self._client

    def queue_path(self) -> str:
        return str(
            self.client.queue_path(
                conf.cloud_tasks("PROJECT"), conf.cloud_tasks("LOCATION"), conf.cloud_tasks("QUEUE")
            )
        )

    def schedule(self, target_ids: list[int], using: str) -> None:
        for target in Target.objects.using(using).filter(pk__in=target_ids):
            try:
                self.enqueue_pending(target, using)
            except google_exceptions.GoogleAPIError as exc:
                push.record_failure(target, f"Cloud Tasks: {exc}", using)

    def enqueue_pending(self, target: Target, using: str) -> int:
        """Create a task per undelivered batch; ``delivered_seq`` then means "enqueued"."""
        created = 0
        parent = self.queue_path()
        email = conf.cloud_tasks("SERVICE_ACCOUNT_EMAIL")
        for batch in push.batches(target, using):
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
                created += 1
            except google_exceptions.AlreadyExists:
                pass  # enqueued before: Cloud Tasks deduplicates by name
            push.record_success(target, batch.last_seq, using)
        return created
