"""System checks: one test per check id, and a test that the checks are bound.

The misconfigured models below are never registered at import time: each test
registers what it needs and the ``clean_registry`` fixture unregisters it, so
the rest of the suite sees the registry exactly as ``tests.testapp`` left it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import models
from django.test import override_settings

import changefeed_sync
from changefeed_sync import registry
from changefeed_sync.checks import check_registered_models, check_settings
from tests.testapp.models import Category, Copy, Country, Kinds, Language, Tag

# --------------------------------------------------------------------------- models
# app_label "testapp" so they live in an installed app; names start with "Chk".


class ChkParent(models.Model):
    """No natural_key(): a foreign key to it only works when it is registered."""

    code = models.CharField(max_length=10, unique=True)
    label = models.CharField(max_length=50, default="")

    class Meta:
        app_label = "testapp"


class ChkChild(models.Model):
    parent = models.ForeignKey(ChkParent, on_delete=models.CASCADE)
    code = models.CharField(max_length=10)
    name = models.CharField(max_length=50, default="")
    slug = models.SlugField(unique=True)

    class Meta:
        app_label = "testapp"
        unique_together = [("parent", "code")]


class ChkKeyedParentManager(models.Manager["ChkKeyedParent"]):
    def get_by_natural_key(self, code: str) -> ChkKeyedParent:
        return self.get(code=code)


class ChkKeyedParent(models.Model):
    """Has Django's natural key protocol, so a foreign key to it needs no registration."""

    code = models.CharField(max_length=10, unique=True)

    objects = ChkKeyedParentManager()

    class Meta:
        app_label = "testapp"

    def natural_key(self) -> tuple[str]:
        return (self.code,)


class ChkKeyedChild(models.Model):
    parent = models.ForeignKey(ChkKeyedParent, on_delete=models.CASCADE)
    code = models.CharField(max_length=10)

    class Meta:
        app_label = "testapp"
        unique_together = [("parent", "code")]


class ChkAccount(models.Model):
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=50, default="")
    api_key = models.CharField(max_length=64, default="")
    password_hash = models.CharField(max_length=128, default="")

    class Meta:
        app_label = "testapp"


class ChkDocument(models.Model):
    slug = models.SlugField(unique=True)
    title = models.CharField(max_length=50, default="")
    attachment = models.FileField(upload_to="chk/", blank=True)

    class Meta:
        app_label = "testapp"


class ChkBase(models.Model):
    slug = models.SlugField(unique=True)

    class Meta:
        app_label = "testapp"


class ChkDerived(ChkBase):
    """Multi-table inheritance: its rows live in two tables."""

    extra = models.CharField(max_length=50, default="")

    class Meta:
        app_label = "testapp"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    """Unregister whatever a test registered, even when it fails half-way."""
    before = set(registry.get_registered_models())
    yield
    for model in set(registry.get_registered_models()) - before:
        changefeed_sync.unregister(model)


def errors_for(model: type[models.Model]) -> list[checks.CheckMessage]:
    """check_registered_models() messages about ``model`` only."""
    return [e for e in check_registered_models() if e.obj is model]


def ids(messages: list[checks.CheckMessage]) -> list[str]:
    return sorted(m.id for m in messages)


def the_one(messages: list[checks.CheckMessage], id: str) -> checks.CheckMessage:
    assert ids(messages) == [f"changefeed_sync.{id}"], [m.msg for m in messages]
    message = messages[0]
    assert message.level == checks.ERROR
    return message


# --------------------------------------------------------------------------- the test app


def test_test_app_registrations_produce_no_errors() -> None:
    for model in (Country, Language, Copy, Tag, Category, Kinds):
        assert changefeed_sync.is_registered(model)
    assert check_registered_models() == []
    assert check_settings() == []


def test_valid_two_level_natural_key_produces_no_errors() -> None:
    changefeed_sync.register(ChkParent, natural_key=["code"])
    changefeed_sync.register(ChkChild, natural_key=["parent.code", "code"])
    assert errors_for(ChkParent) == []
    assert errors_for(ChkChild) == []


# --------------------------------------------------------------------------- E002


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("nope", ["'nope'"]),  # no such field
        ("parent.nope", ["testapp.ChkParent", "'nope'"]),  # no such field one hop away
        ("code.length", ["ChkChild.code", "not a forward foreign key"]),  # walks through a non-FK
    ],
)
def test_e002_natural_key_path_does_not_resolve(path: str, words: list[str]) -> None:
    changefeed_sync.register(ChkParent, natural_key=["code"])
    changefeed_sync.register(ChkChild, natural_key=[path, "slug"])
    message = the_one(errors_for(ChkChild), "E002")
    assert "testapp.ChkChild" in message.msg
    assert path in message.msg
    for word in words:
        assert word in message.msg


def test_e002_natural_key_path_ends_at_a_relation() -> None:
    changefeed_sync.register(ChkParent, natural_key=["code"])
    changefeed_sync.register(ChkChild, natural_key=["parent", "code"])
    message = the_one(errors_for(ChkChild), "E002")
    assert "testapp.ChkChild" in message.msg
    assert "'parent'" in message.msg
    assert "ends at a relation" in message.msg
    assert message.hint is not None and "parent.code" in message.hint


# --------------------------------------------------------------------------- E003


def test_e003_natural_key_not_unique() -> None:
    changefeed_sync.register(ChkChild, natural_key=["code"], exclude=["parent"])
    message = the_one(errors_for(ChkChild), "E003")
    assert "testapp.ChkChild" in message.msg
    assert "'code'" in message.msg


def test_e003_natural_key_through_a_relation_not_unique_together() -> None:
    # (parent, name) is not unique, although (parent, code) is.
    changefeed_sync.register(ChkParent, natural_key=["code"])
    changefeed_sync.register(ChkChild, natural_key=["parent.code", "name"])
    message = the_one(errors_for(ChkChild), "E003")
    assert "testapp.ChkChild" in message.msg
    assert "'parent.code'" in message.msg and "'name'" in message.msg


def test_e003_related_key_does_not_identify_the_related_row() -> None:
    # (parent, code) is unique, but parent.label does not pick one parent,
    # so (parent.label, code) does not pick one child.
    changefeed_sync.register(ChkParent, natural_key=["code"])
    changefeed_sync.register(ChkChild, natural_key=["parent.label", "code"])
    message = the_one(errors_for(ChkChild), "E003")
    assert "testapp.ChkChild" in message.msg
    assert "'parent.label'" in message.msg


# --------------------------------------------------------------------------- E004


def test_e004_natural_key_goes_through_an_unregistered_model() -> None:
    # ChkKeyedParent has natural_key(), so the foreign key itself is fine (no E008);
    # but it is not registered, so its rows need not exist on the target.
    changefeed_sync.register(ChkKeyedChild, natural_key=["parent.code", "code"])
    message = the_one(errors_for(ChkKeyedChild), "E004")
    assert "testapp.ChkKeyedChild" in message.msg
    assert "'parent.code'" in message.msg
    assert "testapp.ChkKeyedParent" in message.msg

    changefeed_sync.register(ChkKeyedParent, natural_key=["code"])
    assert errors_for(ChkKeyedChild) == []


# --------------------------------------------------------------------------- E005


@pytest.mark.parametrize("arg", ["fields", "exclude", "file_fields"])
def test_e005_unknown_name_in_field_lists(arg: str) -> None:
    kwargs: dict[str, Any] = {arg: ["title", "nonexistent"]}
    if arg == "file_fields":
        kwargs = {arg: ["attachment", "nonexistent"]}
    changefeed_sync.register(ChkDocument, natural_key=["slug"], **kwargs)
    message = the_one(errors_for(ChkDocument), "E005")
    assert "testapp.ChkDocument" in message.msg
    assert arg in message.msg
    assert "'nonexistent'" in message.msg


def test_e005_every_unknown_name_is_reported() -> None:
    changefeed_sync.register(
        ChkDocument,
        natural_key=["slug"],
        fields=["nope1"],
        exclude=["nope2"],
        file_fields=["nope3"],
    )
    messages = errors_for(ChkDocument)
    assert ids(messages) == ["changefeed_sync.E005"] * 3
    text = " ".join(m.msg for m in messages)
    for name in ("nope1", "nope2", "nope3"):
        assert f"'{name}'" in text


# --------------------------------------------------------------------------- E006


def test_e006_auth_user_registered() -> None:
    changefeed_sync.register(User, natural_key=["username"])
    messages = errors_for(User)
    assert "changefeed_sync.E006" in ids(messages)
    message = next(m for m in messages if m.id == "changefeed_sync.E006")
    assert "auth.User" in message.msg


def test_e006_sessions_registered() -> None:
    changefeed_sync.register(Session, natural_key=["session_key"])
    message = the_one(errors_for(Session), "E006")
    assert "sessions.Session" in message.msg


# --------------------------------------------------------------------------- E007


def test_e007_secret_looking_fields_are_synced() -> None:
    changefeed_sync.register(ChkAccount, natural_key=["slug"])
    messages = errors_for(ChkAccount)
    assert ids(messages) == ["changefeed_sync.E007"] * 2
    text = " ".join(m.msg for m in messages)
    assert "testapp.ChkAccount.api_key" in text
    assert "testapp.ChkAccount.password_hash" in text
    hints = " ".join(m.hint or "" for m in messages)
    assert "exclude=['api_key']" in hints


def test_e007_silenced_by_exclude() -> None:
    changefeed_sync.register(ChkAccount, natural_key=["slug"], exclude=["api_key", "password_hash"])
    assert errors_for(ChkAccount) == []


def test_e007_silenced_by_leaving_out_of_fields() -> None:
    changefeed_sync.register(ChkAccount, natural_key=["slug"], fields=["name"])
    assert errors_for(ChkAccount) == []


def test_e007_auth_user_password() -> None:
    changefeed_sync.register(User, natural_key=["username"])
    messages = [m for m in errors_for(User) if m.id == "changefeed_sync.E007"]
    assert any("auth.User.password" in m.msg for m in messages)


# --------------------------------------------------------------------------- E008


def test_e008_foreign_key_to_unregistered_model_without_natural_key() -> None:
    changefeed_sync.register(ChkChild, natural_key=["slug"])
    message = the_one(errors_for(ChkChild), "E008")
    assert "testapp.ChkChild.parent" in message.msg
    assert "testapp.ChkParent" in message.msg


def test_e008_silenced_by_registering_the_target_or_excluding_the_field() -> None:
    changefeed_sync.register(ChkChild, natural_key=["slug"], exclude=["parent"])
    assert errors_for(ChkChild) == []
    changefeed_sync.unregister(ChkChild)
    changefeed_sync.register(ChkChild, natural_key=["slug"])
    changefeed_sync.register(ChkParent, natural_key=["code"])
    assert errors_for(ChkChild) == []


def test_e008_not_raised_for_model_with_natural_key_protocol() -> None:
    changefeed_sync.register(ChkKeyedChild, natural_key=["id"], fields=["parent"])
    assert "changefeed_sync.E008" not in ids(errors_for(ChkKeyedChild))


# --------------------------------------------------------------------------- E009


def test_e009_file_fields_names_a_non_file_field() -> None:
    changefeed_sync.register(ChkDocument, natural_key=["slug"], file_fields=["title"])
    message = the_one(errors_for(ChkDocument), "E009")
    assert "testapp.ChkDocument" in message.msg
    assert "'title'" in message.msg


def test_e009_not_raised_for_a_file_field() -> None:
    changefeed_sync.register(ChkDocument, natural_key=["slug"], file_fields=["attachment"])
    assert errors_for(ChkDocument) == []


# --------------------------------------------------------------------------- E010


def test_e010_multi_table_inheritance() -> None:
    changefeed_sync.register(ChkDerived, natural_key=["slug"])
    message = the_one(errors_for(ChkDerived), "E010")
    assert "testapp.ChkDerived" in message.msg
    assert "multi-table inheritance" in message.msg


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FEED_MAX_LIMIT", "lots"),
        ("FEED_MAX_LIMIT", -1),
        ("FEED_MAX_LIMIT", True),  # a bool is not a count
        ("FEED_MAX_WAIT", None),
        ("FOLLOW_WAIT", "25"),
        ("FEED_DATABASE", 5),
    ],
)
def test_e101_bad_setting_type(name: str, value: Any) -> None:
    with override_settings(**{f"CHANGEFEED_SYNC_{name}": value}):
        messages = check_settings()
    message = the_one(messages, "E101")
    assert f"CHANGEFEED_SYNC_{name}" in message.msg
    assert repr(value) in message.msg


@pytest.mark.parametrize(
    ("name", "value"), [("FEED_MAX_LIMIT", 10), ("FEED_MAX_WAIT", 0), ("RETRY_MIN_DELAY", 2)]
)
def test_e101_good_values_pass(name: str, value: Any) -> None:
    with override_settings(**{f"CHANGEFEED_SYNC_{name}": value}):
        assert check_settings() == []


def test_e102_feed_database_is_not_an_alias() -> None:
    with override_settings(CHANGEFEED_SYNC_FEED_DATABASE="nowhere"):
        messages = check_settings()
    message = the_one(messages, "E102")
    assert "CHANGEFEED_SYNC_FEED_DATABASE" in message.msg
    assert "'nowhere'" in message.msg


# --------------------------------------------------------------------------- binding


# Django 6.1's `check` runs the database checks too (JSONField support is asked of
# the database): on "default" only here.
@pytest.mark.django_db
def test_checks_are_bound_to_manage_py_check() -> None:
    call_command("check", databases=["default"])  # the test app as it is: passes
    changefeed_sync.register(ChkDocument, natural_key=["slug"], file_fields=["title"])
    with pytest.raises(SystemCheckError, match=r"changefeed_sync\.E009"):
        call_command("check", databases=["default"])


@pytest.mark.django_db
def test_settings_checks_are_bound_to_manage_py_check() -> None:
    with override_settings(CHANGEFEED_SYNC_FEED_DATABASE="nowhere"):
        with pytest.raises(SystemCheckError, match=r"changefeed_sync\.E102"):
            call_command("check", databases=["default"])
