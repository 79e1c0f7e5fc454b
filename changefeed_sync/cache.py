"""A per-process cache whose entries expire after a fixed number of seconds.

For answers that may be a little stale but are asked for far more often than they
change: the targets that take deliveries (asked after every commit), Google's OIDC
certificates (asked by every Cloud Tasks delivery).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """``get(key, load)``: the value loaded for ``key`` less than ``seconds`` ago, else
    ``load()``'s, kept. Thread-safe; a failing ``load`` keeps nothing."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K, load: Callable[[], V]) -> V:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self.seconds:
                return hit[1]
        # Loaded without the lock: a slow load (a query, a download) holds up no other
        # key. Two threads that miss together both load; the last one's value stays.
        value = load()
        with self._lock:
            self._entries[key] = (now, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
