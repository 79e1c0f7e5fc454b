"""Deliver from a thread of this process, right after commit (the default)."""

from __future__ import annotations

import logging
import threading

from django.db import connections

from .. import push

logger = logging.getLogger("changefeed_sync.push")


class _Worker(threading.Thread):
    """One per target and database: keeps deliveries to a target in order."""

    def __init__(self, target_id: int, using: str) -> None:
        super().__init__(name=f"changefeed-push-{using}-{target_id}", daemon=True)
        self.target_id = target_id
        self.using = using
        self.wake = threading.Event()

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            try:
                retry_in = push.deliver_pending(self.target_id, self.using)
            except Exception:  # keep the worker alive; the error is logged
                logger.exception("delivery to target %s crashed", self.target_id)
                retry_in = 5.0
            finally:
                connections.close_all()
            if retry_in is not None:
                # Sleep through the backoff unless new events (or retry now) wake us.
                self.wake.wait(retry_in)
                self.wake.set()


class InlineBackend:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[tuple[str, int], _Worker] = {}

    def schedule(self, target_ids: list[int], using: str) -> None:
        for target_id in target_ids:
            with self._lock:
                worker = self._workers.get((using, target_id))
                if worker is None or not worker.is_alive():
                    worker = _Worker(target_id, using)
                    self._workers[(using, target_id)] = worker
                    worker.start()
            worker.wake.set()
