"""What a delivery backend is: the one thing that differs between ways of pushing.

What a delivery sends (the batches, their signatures) and how its outcome is recorded
(``Target.delivered_seq``, failures and backoff) are push.py's and batches.py's, the
same for every backend; a backend decides where and when the batches go. It is chosen
by dotted path (``CHANGEFEED_SYNC_DELIVERY_BACKEND``) and made once per process
(``push.backend()``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class DeliveryBackend(ABC):
    """Base class of the delivery backends."""

    @abstractmethod
    def schedule(self, target_ids: list[int], using: str) -> None:
        """Deliver what is pending for these targets of database ``using``, now or later.

        Called in the committing thread after a commit that wrote events (so it should
        not make the writer wait long), by "Retry delivery now" and when a server
        resumes deliveries another process left.
        """

    @staticmethod
    def configuration_problems() -> list[str]:
        """What the settings lack for this backend, each reported as system check E104
        (the checks ask the class, before any instance exists). None by default."""
        return []
