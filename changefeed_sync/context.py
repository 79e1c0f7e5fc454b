"""Whether the current code is applying changes received from a source.

Kept apart from capture.py so that ``changefeed_sync.applying`` can be
imported before the app registry is ready (it touches no model).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_applying: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "changefeed_applying", default=False
)


@contextmanager
def applying() -> Iterator[None]:
    """Writes inside this block are changes received from a source: do not capture them."""
    token = _applying.set(True)
    try:
        yield
    finally:
        _applying.reset(token)
