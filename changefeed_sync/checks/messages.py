"""The two kinds of message every check here returns, with the app's id prefix."""

from __future__ import annotations

from typing import Any

from django.core import checks


def _error(msg: str, hint: str | None, obj: Any, id: str) -> checks.Error:
    return checks.Error(msg, hint=hint, obj=obj, id=f"changefeed_sync.{id}")


def _warning(msg: str, hint: str | None, obj: Any, id: str) -> checks.Warning:
    return checks.Warning(msg, hint=hint, obj=obj, id=f"changefeed_sync.{id}")
