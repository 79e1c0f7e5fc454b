"""What one Target may read: which registered models, and which rows of each.

A :class:`Selection` is built once per request from the Target that signed it
(``Target.model_labels``, ``Target.row_filters``) and handed to whatever reads rows
for it: the feed (its models), the snapshot's start, pages and digests, the files
served. Each model's rows are restricted by the ``Q`` of its row filter
(filters.queryset_filter), which the database applies (a ``WHERE`` on the model's own
table, joined to its parents when the filter follows a foreign key), so a filtered
page costs a keyset page of the rows that match, never a pass over the table here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from django.db import models
from django.db.models import Q

from . import registry
from .exceptions import RowFiltersInvalid
from .filters import filter_problems, is_filtered, queryset_filter
from .registry import ModelOptions

if TYPE_CHECKING:
    from .models import Target

_NO_FILTERS: Mapping[str, Q] = MappingProxyType({})


@dataclass(frozen=True)
class Selection:
    """The models a reader may read (``labels``, lower case; None: every registered
    one) and, per model label, the ``Q`` its rows must match (absent: every row)."""

    labels: frozenset[str] | None = None
    row_filters: Mapping[str, Q] = field(default_factory=lambda: _NO_FILTERS)

    @classmethod
    def everything(cls) -> Selection:
        """Every row of every registered model: no Target restricts the reader."""
        return cls()

    @classmethod
    def of(cls, target: Target) -> Selection:
        """What ``target`` may read. Raises RowFiltersInvalid when its saved row
        filters are not valid (E011): nothing is read for it rather than too much."""
        allowed = target.allowed_models()
        labels = None if allowed is None else frozenset(allowed)
        if not is_filtered(target.row_filters):
            return cls(labels)
        problems = filter_problems(target.row_filters)
        if problems:
            raise RowFiltersInvalid(target.name, problems)
        found: dict[str, Q] = {}
        for options in registry.all_options():
            q = queryset_filter(target.row_filters, options.label)
            if q is not None:
                found[options.label] = q
        return cls(labels, MappingProxyType(found))

    @property
    def filtered(self) -> bool:
        """Whether some model's rows are restricted."""
        return bool(self.row_filters)

    def model_list(self) -> list[str] | None:
        """The labels, sorted (None: every registered model), as the feed takes them."""
        return None if self.labels is None else sorted(self.labels)

    def offers(self, label: str) -> bool:
        """Whether ``label`` is a registered model this selection reads."""
        options = registry.options_for_label(label)
        return options is not None and (self.labels is None or options.label in self.labels)

    def registered(self) -> list[type[models.Model]]:
        """The registered models this selection reads, in registration order."""
        return [
            model
            for model in registry.get_registered_models()
            if self.labels is None or model._meta.label_lower in self.labels
        ]

    def rows_filter(self, label: str) -> Q | None:
        """The ``Q`` the rows of model ``label`` must match; None: every row."""
        return self.row_filters.get(label)

    def rows(self, options: ModelOptions, using: str) -> models.QuerySet[Any]:
        """The rows of a model this selection reads, on database ``using``."""
        queryset: models.QuerySet[Any] = options.model._base_manager.using(using).all()
        q = self.rows_filter(options.label)
        return queryset if q is None else queryset.filter(q)
