"""Signals this app sends.

``events_committed``: a transaction that wrote outbox events committed on the
database ``using``. Sent after the commit, in the writer's thread; a
transaction that wrote several times may send it once per write, so a receiver
should treat it as "look again", not count it. The outbox knows
nothing of who reads it: the long-poll notifier and push deliveries listen here
(connected in ``AppConfig.ready``), and so may a project. Receivers must be
quick. The writer's data is already committed, so a receiver's exception must
not reach it: it is sent with ``send_robust``, which logs the exception
(logger ``django.dispatch``) and still runs the next receiver.
"""

from __future__ import annotations

from django.dispatch import Signal

#: Sent with ``sender=Event`` (the outbox model) and ``using`` (the database alias).
events_committed = Signal()


def send_events_committed(using: str) -> None:
    from .models import Event

    events_committed.send_robust(sender=Event, using=using)
