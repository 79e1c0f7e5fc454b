"""Checks that read the database (run by ``migrate`` and ``check --database``)."""

from __future__ import annotations

from typing import Any

from django.core import checks

from .messages import _error


@checks.register(checks.Tags.database)
def check_row_filters(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E011: Targets' row_filters that Target.clean() refuses (saved past it, or a
    registration changed since). Reads Target rows: database checks only."""
    from ..filters import saved_filter_problems
    from ..models import Target

    hint = "Correct the Target's row filters in the admin, which lists the same problems."
    return [
        _error(message, hint, target, "E011")
        for target, message in saved_filter_problems(Target.objects, kwargs.get("databases"))
    ]
