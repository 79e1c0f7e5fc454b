"""Checks that read the database (run by ``migrate`` and ``check --database``)."""

from __future__ import annotations

from typing import Any

from django.core import checks

from .messages import _error, _warning


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


@checks.register(checks.Tags.database)
def check_filtered_models_received(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W005: a Target's row_filters name a model its models leave out, so that filter
    is never used (Target.clean() refuses it; saved past it, or the models changed by
    hand since). Reads Target rows: database checks only."""
    from ..filters import saved_filter_problems, unreceived_problems
    from ..models import Target

    hint = "Tick the model in the Target's models in the admin, or remove its filter."
    found = saved_filter_problems(
        Target.objects,
        kwargs.get("databases"),
        lambda target: unreceived_problems(target.row_filters, target.allowed_models()),
    )
    return [_warning(message, hint, target, "W005") for target, message in found]
