"""Which models are synced, and how each is identified by natural key.

``register()`` works as a function (for models you do not own) and as a
decorator (``register_model``, the name django-data-sync used). Options are
kept in an immutable record; everything derived from them is computed once.
Misconfiguration that can only be judged once all apps are loaded (a path
that does not resolve, a key that is not unique) is reported by the system
checks in ``checks/``, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import models

from .exceptions import RegistrationError

if TYPE_CHECKING:
    from django.db.models.fields import Field
    from django.db.models.fields.related import ForeignKey, ManyToManyField

M = TypeVar("M", bound=type[models.Model])

Key = tuple[Any, ...]

# Text columns whose JSON form is already the Python value: applying skips
# to_python for them (it is called for every value of every event).
TEXT_TYPES = frozenset(
    {"CharField", "TextField", "SlugField", "EmailField", "URLField", "FilePathField"}
)


@dataclass(frozen=True)
class ModelOptions:
    model: type[models.Model]
    natural_key: tuple[str, ...]
    fields: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    file_fields: tuple[str, ...] = ()

    @cached_property
    def label(self) -> str:
        return self.model._meta.label_lower

    @cached_property
    def text_key(self) -> bool:
        """Whether every natural-key part is a text column (keys then need no normalizing)."""
        return all(
            f.get_internal_type() in ("CharField", "TextField", "SlugField", "EmailField")
            for f in self.key_fields
        )

    @cached_property
    def lookups(self) -> tuple[str, ...]:
        """The natural key as ORM lookups: ``language.code`` -> ``language__code``."""
        return tuple(path.replace(".", "__") for path in self.natural_key)

    @cached_property
    def key_fields(self) -> tuple[Field[Any, Any], ...]:
        """The leaf field at the end of each natural-key path."""
        return tuple(resolve_path(self.model, path)[-1] for path in self.natural_key)

    @cached_property
    def key_heads(self) -> tuple[str, ...]:
        """Local fields the natural key starts from (``language``, ``key``), in order, unique."""
        heads: list[str] = []
        for path in self.natural_key:
            head = path.split(".", 1)[0]
            if head not in heads:
                heads.append(head)
        return tuple(heads)

    def _wanted(self, name: str) -> bool:
        if name in self.exclude:
            return False
        if self.fields is None:
            return True
        return name in self.fields or name in self.file_fields or name in self.key_heads

    @cached_property
    def concrete_fields(self) -> tuple[Field[Any, Any], ...]:
        """Synced local columns, foreign keys included, primary key excluded."""
        return tuple(
            f
            for f in self.model._meta.concrete_fields
            if not f.primary_key and self._wanted(f.name)
        )

    @cached_property
    def plain_fields(self) -> tuple[Field[Any, Any], ...]:
        return tuple(f for f in self.concrete_fields if not f.is_relation)

    @cached_property
    def fk_fields(self) -> tuple[ForeignKey[Any, Any], ...]:
        return tuple(f for f in self.concrete_fields if f.is_relation)  # type: ignore[misc]

    @cached_property
    def m2m_fields(self) -> tuple[ManyToManyField[Any, Any], ...]:
        return tuple(f for f in self.model._meta.local_many_to_many if self._wanted(f.name))

    @cached_property
    def plain_decoding(self) -> tuple[tuple[Field[Any, Any], bool], ...]:
        """``(field, needs to_python)`` per plain field: text columns take their JSON
        string as it is (apply decodes every value of every event)."""
        return tuple((f, f.get_internal_type() not in TEXT_TYPES) for f in self.plain_fields)

    @cached_property
    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in (*self.concrete_fields, *self.m2m_fields))

    @cached_property
    def payload_in_memory(self) -> bool:
        """Whether an instance alone gives its payload: no relation in the payload or
        the key, and no synced or key column whose value only the database knows (a
        generated column, an auto-increment key, one read back after the write)."""
        return not (
            self.fk_fields
            or self.m2m_fields
            or any("." in p for p in self.natural_key)
            or any(getattr(f, "db_returning", False) for f in self.plain_fields)
            or any(getattr(f, "db_returning", False) for f in self.key_fields)
        )

    @cached_property
    def all_changed(self) -> tuple[str, ...]:
        """``changed`` of an event that sets every synced column (a new row)."""
        return tuple(sorted(f.name for f in self.concrete_fields))

    @cached_property
    def upsert_unique_fields(self) -> tuple[str, ...] | None:
        """Local fields whose unique constraint matches the natural key, if one does.

        When there is one, apply can write new and existing rows with one
        ``INSERT ... ON CONFLICT`` instead of reading them first.
        """
        heads = set(self.key_heads)
        for group in unique_groups(self.model):
            if set(group) == heads:
                return tuple(group)
        return None

    @cached_property
    def other_unique_groups(self) -> tuple[tuple[str, ...], ...]:
        """Sets of local fields kept unique besides the primary key and the natural key
        (an alpha-3 code beside the key). A row written by natural key can clash with
        another row on them, and MySQL's ``ON DUPLICATE KEY UPDATE`` would then update
        that other row: upserts of such models must not use it."""
        pk = self.model._meta.pk
        heads = set(self.key_heads)
        return tuple(
            group
            for group in unique_groups(self.model)
            if set(group) != heads and not (pk is not None and group == (pk.name,))
        )


_registry: dict[type[models.Model], ModelOptions] = {}
_on_register: list[Callable[[ModelOptions], None]] = []
_on_unregister: list[Callable[[ModelOptions], None]] = []


def _as_tuple(value: Iterable[str] | str | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise RegistrationError(
            f"{name} must be a list or tuple of names, not the string {value!r}"
        )
    return tuple(value)


def register(
    model: type[models.Model],
    natural_key: Sequence[str],
    fields: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    file_fields: Iterable[str] | None = None,
) -> type[models.Model]:
    """Register ``model`` for change capture and replication."""
    if not (isinstance(model, type) and issubclass(model, models.Model)):
        raise RegistrationError(f"{model!r} is not a Django model class")
    if model._meta.abstract:
        raise RegistrationError(f"{model.__name__} is abstract and has no table to sync")
    if model in _registry:
        raise RegistrationError(f"{model._meta.label} is already registered with changefeed_sync")
    key = _as_tuple(natural_key, "natural_key")
    if not key:
        raise RegistrationError(f"{model._meta.label}: natural_key must name at least one field")
    options = ModelOptions(
        model=model,
        natural_key=key,
        fields=_as_tuple(fields, "fields"),
        exclude=_as_tuple(exclude, "exclude") or (),
        file_fields=_as_tuple(file_fields, "file_fields") or (),
    )
    _registry[model] = options
    for hook in _on_register:
        hook(options)
    return model


def register_model(
    natural_key: Sequence[str],
    fields: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    file_fields: Iterable[str] | None = None,
) -> Callable[[M], M]:
    """Class decorator form of :func:`register`, as in django-data-sync."""

    def decorator(model: M) -> M:
        register(model, natural_key, fields=fields, exclude=exclude, file_fields=file_fields)
        return model

    return decorator


def unregister(model: type[models.Model]) -> None:
    try:
        options = _registry.pop(model)
    except KeyError:
        raise RegistrationError(
            f"{model._meta.label} is not registered with changefeed_sync"
        ) from None
    for hook in _on_unregister:
        hook(options)


def is_registered(model: type[models.Model]) -> bool:
    return model in _registry


def get_options(model: type[models.Model]) -> ModelOptions | None:
    return _registry.get(model)


def get_registered_models() -> tuple[type[models.Model], ...]:
    return tuple(_registry)


def all_options() -> tuple[ModelOptions, ...]:
    return tuple(_registry.values())


def options_for_label(label: str) -> ModelOptions | None:
    for options in _registry.values():
        if options.label == label:
            return options
    return None


# --------------------------------------------------------------------------
# Model introspection helpers shared by checks, serialization and apply.


def resolve_path(model: type[models.Model], path: str) -> list[Field[Any, Any]]:
    """Fields along a dotted path; raises ``LookupError`` naming the bad part."""
    chain: list[Field[Any, Any]] = []
    current = model
    parts = path.split(".")
    for index, part in enumerate(parts):
        try:
            f = current._meta.get_field(part)
        except Exception:
            raise LookupError(
                f"{current._meta.label} has no field {part!r} (in natural key path {path!r})"
            ) from None
        chain.append(f)  # type: ignore[arg-type]
        if index < len(parts) - 1:
            if not (f.many_to_one or f.one_to_one) or not f.concrete:
                raise LookupError(
                    f"{current._meta.label}.{part} is not a forward foreign key, so natural key "
                    f"path {path!r} cannot go through it"
                )
            current = f.related_model  # type: ignore[assignment]
    return chain


def unique_groups(model: type[models.Model]) -> list[tuple[str, ...]]:
    """Every set of local field names the database keeps unique."""
    opts = model._meta
    groups: list[tuple[str, ...]] = [(f.name,) for f in opts.concrete_fields if f.unique]
    groups.extend(tuple(group) for group in opts.unique_together)
    for constraint in opts.total_unique_constraints:
        groups.append(tuple(constraint.fields))
    return groups


def identifies_rows(model: type[models.Model], paths: Sequence[str]) -> bool:
    """Whether values along ``paths`` pick at most one row of ``model``.

    A foreign key counts as identified when the sub-paths through it identify
    the related row, so ``language.country.code`` + ``language.code`` names a
    language when (country, code) is unique there and ``code`` is unique on
    country.
    """
    by_head: dict[str, list[str]] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        by_head.setdefault(head, [])
        if rest:
            by_head[head].append(rest)
    identified = set()
    for head, rests in by_head.items():
        try:
            f = model._meta.get_field(head)
        except Exception:
            return False
        if not rests:
            identified.add(head)
        elif f.related_model is not None and identifies_rows(f.related_model, rests):
            identified.add(head)
    return any(set(group) <= identified for group in unique_groups(model))
