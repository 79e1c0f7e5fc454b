"""System checks: one test per check id, and a test that the checks are bound.

The misconfigured models below are never registered at import time: each test
registers what it needs and the ``clean_registry`` fixture unregisters it, so
the rest of the suite sees the registry exactly as ``tests.testapp`` left it.
"""

from __future__ import annotations

from typing import Any

import django
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import models
from django.test import override_settings

import changefeed_sync
from changefeed_sync import conf
from changefeed_sync.checks import (
    SETTING_CHECKS,
    check_delivery,
    check_registered_models,
    check_settings,
    check_sqlite_transaction_mode,
    check_wsgi_long_polls,
    looks_secret,
)
from changefeed_sync.source.delivery.base import DeliveryBackend
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


class ChkVault(models.Model):
    """Secret-looking names that E007's old substring match missed."""

    slug = models.SlugField(unique=True)
    pin = models.CharField(max_length=8, default="")
    pwd_hash = models.CharField(max_length=128, default="")
    credentials = models.JSONField(default=dict)

    class Meta:
        app_label = "testapp"


class ChkGadget(models.Model):
    """Names that contain a secret-looking word without being one: no E007."""

    slug = models.SlugField(unique=True)
    pinned = models.BooleanField(default=False)
    spinner = models.CharField(max_length=20, default="")
    passenger_count = models.IntegerField(default=0)
    secretary = models.CharField(max_length=50, default="")
    keyword = models.CharField(max_length=50, default="")
    compass_heading = models.IntegerField(default=0)

    class Meta:
        app_label = "testapp"


class ChkNote(models.Model):
    """Relations to the user model: usernames would travel in its events.

    No database constraints: tests.testapp has no migrations, so its tables are created
    before auth's, and a constraint on auth_user could not be (PostgreSQL, MariaDB).
    """

    slug = models.SlugField(unique=True)
    author = models.ForeignKey(
        User, null=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    editors = models.ManyToManyField(User, related_name="+", db_constraint=False)
    text = models.TextField(default="")

    class Meta:
        app_label = "testapp"
        managed = False


class ChkNullableKey(models.Model):
    number = models.IntegerField(unique=True, null=True)

    class Meta:
        app_label = "testapp"


class ChkLooseChild(models.Model):
    """A natural key through a nullable foreign key."""

    parent = models.ForeignKey(ChkParent, null=True, on_delete=models.CASCADE, related_name="+")
    code = models.CharField(max_length=10)

    class Meta:
        app_label = "testapp"
        unique_together = [("parent", "code")]


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


# Unregisters whatever a test registered, even when it fails half-way (conftest.py).
pytestmark = pytest.mark.usefixtures("clean_registry")


def errors_for(model: type[models.Model]) -> list[checks.CheckMessage]:
    """check_registered_models() messages about ``model`` only."""
    return [e for e in check_registered_models() if e.obj is model]


def ids(messages: list[checks.CheckMessage]) -> list[str]:
    return sorted(m.id for m in messages)


def the_one(
    messages: list[checks.CheckMessage], id: str, level: int = checks.ERROR
) -> checks.CheckMessage:
    assert ids(messages) == [f"changefeed_sync.{id}"], [m.msg for m in messages]
    message = messages[0]
    assert message.level == level
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


def test_e007_pin_pwd_hash_and_credentials() -> None:
    changefeed_sync.register(ChkVault, natural_key=["slug"])
    messages = errors_for(ChkVault)
    assert ids(messages) == ["changefeed_sync.E007"] * 3
    text = " ".join(m.msg for m in messages)
    for name in ("pin", "pwd_hash", "credentials"):
        assert f"testapp.ChkVault.{name} " in text


def test_e007_not_raised_for_words_that_only_contain_a_secret_word() -> None:
    changefeed_sync.register(ChkGadget, natural_key=["slug"])
    assert errors_for(ChkGadget) == []


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "password_hash",
        "password2",
        "passwd",
        "user_pass",
        "pwd_hash",
        "pin",
        "pin_code",
        "card_pin",
        "credentials",
        "smtp_credential",
        "api_key",
        "apikey",
        "apiKey",
        "APIKey",
        "private_key",
        "aws_access_key",
        "client_secret",
        "refresh_token",
        "otp",
        "totp_seed",
        "salt",
    ],
)
def test_e007_names_that_look_secret(name: str) -> None:
    assert looks_secret(name), name


@pytest.mark.parametrize(
    "name",
    [
        "pinned",
        "spinner",
        "is_pinned",
        "pinyin",
        "passenger",
        "bypass_cache",
        "compass",
        "secretary",
        "tokenizer",
        "keyword",
        "monkey",
        "key",
        "natural_key",
        "sort_key",
        "basalt",
        "hotpot",
        "credit",
        "content_hash",
    ],
)
def test_e007_names_that_do_not_look_secret(name: str) -> None:
    assert not looks_secret(name), name


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


# --------------------------------------------------------------------------- W002


def test_w002_relations_to_the_user_model() -> None:
    changefeed_sync.register(ChkNote, natural_key=["slug"])
    messages = errors_for(ChkNote)
    assert ids(messages) == ["changefeed_sync.W002"] * 2
    assert all(m.level == checks.WARNING for m in messages)
    text = " ".join(m.msg for m in messages)
    assert "testapp.ChkNote.author" in text and "testapp.ChkNote.editors" in text
    assert "auth.User" in text
    hints = " ".join(m.hint or "" for m in messages)
    assert "exclude=['author']" in hints


def test_w002_silenced_by_exclude() -> None:
    changefeed_sync.register(ChkNote, natural_key=["slug"], exclude=["author", "editors"])
    assert errors_for(ChkNote) == []


def test_w002_follows_auth_user_model(settings: Any) -> None:
    # A project whose user model is another one: auth.User is then ordinary data.
    settings.AUTH_USER_MODEL = "testapp.ChkParent"
    changefeed_sync.register(ChkNote, natural_key=["slug"])
    assert errors_for(ChkNote) == []


# --------------------------------------------------------------------------- W003


def test_w003_nullable_natural_key_field() -> None:
    changefeed_sync.register(ChkNullableKey, natural_key=["number"])
    message = the_one(errors_for(ChkNullableKey), "W003", checks.WARNING)
    assert "testapp.ChkNullableKey" in message.msg
    assert "'number'" in message.msg
    assert "NULL" in message.msg


def test_w003_natural_key_through_a_nullable_foreign_key() -> None:
    changefeed_sync.register(ChkParent, natural_key=["code"])
    changefeed_sync.register(ChkLooseChild, natural_key=["parent.code", "code"])
    message = the_one(errors_for(ChkLooseChild), "W003", checks.WARNING)
    assert "'parent.code'" in message.msg
    assert "parent" in message.msg
    assert errors_for(ChkParent) == []


def test_w003_not_raised_for_not_null_keys() -> None:
    changefeed_sync.register(ChkParent, natural_key=["code"])
    changefeed_sync.register(ChkChild, natural_key=["parent.code", "code"])
    assert errors_for(ChkChild) == []


# --------------------------------------------------------------------------- settings


# One id per setting, each tested with the values it refuses (django-cors-headers'
# tests/test_checks.py does the same for its settings).
BAD_SETTINGS = [
    ("E102", "FEED_DATABASE", "nowhere"),
    ("E102", "FEED_DATABASE", 5),
    ("E105", "FEED_MAX_LIMIT", "lots"),
    ("E105", "FEED_MAX_LIMIT", -1),
    ("E105", "FEED_MAX_LIMIT", 0),
    ("E105", "FEED_MAX_LIMIT", True),  # a bool is not a count
    ("E106", "FEED_DEFAULT_LIMIT", 2.5),
    ("E107", "FEED_MAX_WAIT", None),
    ("E107", "FEED_MAX_WAIT", -1),
    ("E108", "FEED_POLL_INTERVAL", 0),  # would spin
    ("E109", "SIGNATURE_MAX_AGE", 0),
    ("E109", "SIGNATURE_MAX_AGE", "60"),
    ("E110", "RETENTION_DAYS", "30"),
    ("E111", "DELIVERY_RETRY_DELAYS", []),
    ("E111", "DELIVERY_RETRY_DELAYS", [0, -5]),
    ("E111", "DELIVERY_RETRY_DELAYS", "0,5,300"),
    ("E111", "DELIVERY_RETRY_DELAYS", 5),
    ("E112", "DELIVERY_MAX_BYTES", 0),
    ("E113", "DELIVERY_TIMEOUT", 0),
    ("E114", "CLOUD_TASKS_PROJECT", None),
    ("E115", "CLOUD_TASKS_LOCATION", 1),
    ("E116", "CLOUD_TASKS_QUEUE", ["changefeed-sync"]),
    ("E117", "CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL", None),
    ("E118", "CLOUD_TASKS_EMULATOR_HOST", 8123),
    ("E119", "PREPARE_STATEMENTS", "yes"),
    ("E119", "PREPARE_STATEMENTS", 1),
    ("E120", "TARGET_DATABASE", "nowhere"),
    ("E121", "WEBHOOK_TOLERANCE", 0.5),
    ("E122", "WEBHOOK_MAX_BYTES", "1MB"),
    ("E123", "OIDC_CERTS_URL", "www.googleapis.com/oauth2/v1/certs"),
    ("E124", "BATCH_SIZE", "1000"),
    ("E125", "FOLLOW_WAIT", "25"),
    ("E126", "REQUEST_TIMEOUT", -1),
    ("E127", "RETRY_MIN_DELAY", None),
    ("E128", "RETRY_MAX_DELAY", 0),
    ("E129", "PULL_PAGE_SIZE", 0),
    ("E130", "PULL_STALE_AFTER", "2 minutes"),
    ("E131", "MAX_FILE_SIZE", "100MB"),
    ("E132", "WEBHOOK_FILES_SECONDS", -1),
    ("E133", "FEED_WSGI_WAITERS", -1),
    ("E133", "FEED_WSGI_WAITERS", 2.5),
    ("E133", "FEED_WSGI_WAITERS", "2"),
    ("E133", "FEED_WSGI_WAITERS", True),
    ("E134", "FEED_WSGI_RETRY_AFTER", 0),  # followers would ask again at once
    ("E134", "FEED_WSGI_RETRY_AFTER", "1"),
    ("E135", "DELIVERY_WORKERS", 0),  # no thread would deliver
    ("E135", "DELIVERY_WORKERS", 2.5),
    ("E136", "DELIVERY_EXIT_WAIT", -1),
    ("E136", "DELIVERY_EXIT_WAIT", "5"),
    ("E137", "FOLLOW_STREAM", "False"),  # a non-empty string would stream
    ("E137", "FOLLOW_STREAM", 0),
    ("E137", "FOLLOW_STREAM", None),
]


@pytest.mark.parametrize(("id", "name", "value"), BAD_SETTINGS)
def test_setting_with_a_bad_value_has_its_own_id(id: str, name: str, value: Any) -> None:
    with override_settings(**{f"CHANGEFEED_SYNC_{name}": value}):
        messages = check_settings()
    message = the_one(messages, id)
    assert f"CHANGEFEED_SYNC_{name}" in message.msg
    assert repr(value) in message.msg
    assert message.hint == f"The default is {conf.DEFAULTS[name]!r}."


def test_every_setting_has_one_id_and_a_test() -> None:
    checked = {
        **{name: id for name, (id, _, _) in SETTING_CHECKS.items()},
        "DELIVERY_BACKEND": "E103",
    }
    assert set(checked) == set(conf.DEFAULTS)
    assert len(set(checked.values())) == len(checked)  # no id shared by two settings
    assert "E101" not in checked.values()  # retired: "some setting has the wrong type"
    tested = {(id, name) for id, name, _ in BAD_SETTINGS}
    assert tested >= {(id, name) for name, id in checked.items() if name != "DELIVERY_BACKEND"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # The documented values that E101 refused.
        ("PREPARE_STATEMENTS", True),
        ("PREPARE_STATEMENTS", False),
        ("PREPARE_STATEMENTS", None),
        ("DELIVERY_RETRY_DELAYS", (0, 5, 300)),
        ("DELIVERY_RETRY_DELAYS", [0.5]),
        ("FEED_MAX_LIMIT", 10),
        ("FEED_MAX_WAIT", 0),
        ("FEED_MAX_WAIT", 2.5),
        ("RETRY_MIN_DELAY", 2),
        ("RETENTION_DAYS", 0.5),
        ("SIGNATURE_MAX_AGE", 300),
        ("FEED_DATABASE", "default"),
        ("FEED_WSGI_WAITERS", 0),  # no long-poll waits under WSGI at all
        ("FEED_WSGI_WAITERS", 4),
        ("FEED_WSGI_RETRY_AFTER", 0.5),
        ("DELIVERY_WORKERS", 16),
        ("DELIVERY_EXIT_WAIT", 0),  # do not wait at exit
        ("FOLLOW_STREAM", False),  # long-poll page by page (a buffering proxy)
        ("TARGET_DATABASE", "default"),
        ("OIDC_CERTS_URL", "http://127.0.0.1:8123/certs"),
        ("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:8123"),
        ("DELIVERY_BACKEND", None),
    ],
)
def test_good_setting_values_pass(name: str, value: Any) -> None:
    with override_settings(**{f"CHANGEFEED_SYNC_{name}": value}):
        assert check_settings() == []
        assert check_delivery() == []


def test_the_defaults_pass() -> None:
    assert check_settings() == []
    assert check_delivery() == []


def test_e128_retry_max_delay_below_the_minimum() -> None:
    with override_settings(CHANGEFEED_SYNC_RETRY_MIN_DELAY=10, CHANGEFEED_SYNC_RETRY_MAX_DELAY=5):
        message = the_one(check_settings(), "E128")
    assert "CHANGEFEED_SYNC_RETRY_MAX_DELAY" in message.msg
    assert "CHANGEFEED_SYNC_RETRY_MIN_DELAY" in message.msg


def test_several_bad_settings_each_get_their_id() -> None:
    with override_settings(
        CHANGEFEED_SYNC_FEED_MAX_LIMIT="x",
        CHANGEFEED_SYNC_BATCH_SIZE=0,
        CHANGEFEED_SYNC_FEED_DATABASE=1,
    ):
        assert ids(check_settings()) == [
            "changefeed_sync.E102",
            "changefeed_sync.E105",
            "changefeed_sync.E124",
        ]


def test_e102_feed_database_is_not_an_alias() -> None:
    with override_settings(CHANGEFEED_SYNC_FEED_DATABASE="nowhere"):
        messages = check_settings()
    message = the_one(messages, "E102")
    assert "CHANGEFEED_SYNC_FEED_DATABASE" in message.msg
    assert "'nowhere'" in message.msg


# --------------------------------------------------------------------------- E103, E104


class ChkProblemBackend(DeliveryBackend):
    """A delivery backend that reports what its configuration lacks."""

    def schedule(self, target_ids: list[int], using: str) -> None:
        raise AssertionError("checks make no backend")

    @staticmethod
    def configuration_problems() -> list[str]:
        return ["ChkProblemBackend needs a queue.", "ChkProblemBackend needs a name."]


@pytest.mark.parametrize(
    "path",
    [
        "nowhere.Backend",  # no such module
        "changefeed_sync.source.delivery.inline.NoSuchBackend",  # no such class
        "InlineBackend",  # not a dotted path
    ],
)
def test_e103_delivery_backend_cannot_be_imported(path: str) -> None:
    with override_settings(CHANGEFEED_SYNC_DELIVERY_BACKEND=path):
        message = the_one(check_delivery(), "E103")
    assert "CHANGEFEED_SYNC_DELIVERY_BACKEND" in message.msg
    assert repr(path) in message.msg
    assert message.hint is not None and "cloudtasks" in message.hint


def test_e103_delivery_backend_is_not_a_path() -> None:
    with override_settings(CHANGEFEED_SYNC_DELIVERY_BACKEND=5):
        message = the_one(check_delivery(), "E103")
    assert "must be a dotted path or None, got 5" in message.msg


@pytest.mark.parametrize(
    "path",
    [
        "changefeed_sync.source.delivery.inline.InlineBackend",
        "changefeed_sync.source.delivery.django_tasks.DjangoTasksBackend",
        "changefeed_sync.source.delivery.loopback.LoopbackBackend",
        None,
    ],
)
def test_e103_e104_not_raised_for_usable_backends(path: str | None) -> None:
    with override_settings(CHANGEFEED_SYNC_DELIVERY_BACKEND=path):
        assert check_delivery() == []


@pytest.mark.parametrize("name", ["inline.InlineBackend", "loopback.LoopbackBackend"])
def test_backends_named_by_their_former_paths_still_work(name: str) -> None:
    """Before the source side had a package of its own, the backends lived in
    changefeed_sync.delivery: settings naming them there keep working."""
    with override_settings(CHANGEFEED_SYNC_DELIVERY_BACKEND=f"changefeed_sync.delivery.{name}"):
        assert check_delivery() == []
        assert conf.delivery_backend() == f"changefeed_sync.source.delivery.{name}"
        from changefeed_sync.source import push

        assert type(push.backend()).__name__ == name.split(".")[1]


def test_e104_backend_reports_its_configuration_problems() -> None:
    with override_settings(CHANGEFEED_SYNC_DELIVERY_BACKEND=f"{__name__}.ChkProblemBackend"):
        messages = check_delivery()
    assert ids(messages) == ["changefeed_sync.E104"] * 2
    assert [m.msg for m in messages] == ChkProblemBackend.configuration_problems()


def test_e104_cloud_tasks_without_project_queue_or_account() -> None:
    pytest.importorskip("google.cloud.tasks_v2")
    cloud_tasks = "changefeed_sync.source.delivery.cloud_tasks.CloudTasksBackend"
    with override_settings(
        CHANGEFEED_SYNC_DELIVERY_BACKEND=cloud_tasks,
        CHANGEFEED_SYNC_CLOUD_TASKS_PROJECT="",
        CHANGEFEED_SYNC_CLOUD_TASKS_QUEUE="",
        CHANGEFEED_SYNC_CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL="",
    ):
        messages = check_delivery()
    assert ids(messages) == ["changefeed_sync.E104"] * 3
    text = " ".join(m.msg for m in messages)
    for name in ("PROJECT", "QUEUE", "SERVICE_ACCOUNT_EMAIL"):
        assert f"CHANGEFEED_SYNC_CLOUD_TASKS_{name}" in text

    with override_settings(
        CHANGEFEED_SYNC_DELIVERY_BACKEND=cloud_tasks,
        CHANGEFEED_SYNC_CLOUD_TASKS_PROJECT="proj",
        CHANGEFEED_SYNC_CLOUD_TASKS_SERVICE_ACCOUNT_EMAIL="tasks@proj.iam.gserviceaccount.com",
    ):
        assert check_delivery() == []


# --------------------------------------------------------------------------- W001

_SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": "x.sqlite3"}
_POSTGRES = {"ENGINE": "django.db.backends.postgresql", "NAME": "x"}


@pytest.mark.skipif(django.VERSION < (5, 1), reason="transaction_mode needs Django >= 5.1")
def test_w001_sqlite_without_immediate_transactions(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check reads settings.DATABASES only; override_settings(DATABASES=...) would warn.
    monkeypatch.setattr(
        settings,
        "DATABASES",
        {
            "default": _SQLITE,
            "immediate": {**_SQLITE, "OPTIONS": {"transaction_mode": "IMMEDIATE"}},
            "deferred": {**_SQLITE, "OPTIONS": {"transaction_mode": "DEFERRED"}},
            "pg": _POSTGRES,
        },
    )
    messages = check_sqlite_transaction_mode()
    assert ids(messages) == ["changefeed_sync.W001"] * 2
    assert all(m.level == checks.WARNING for m in messages)
    assert "'default'" in messages[0].msg and "'deferred'" in messages[1].msg
    assert messages[0].hint is not None and "database is locked" in messages[0].hint


def test_w001_not_raised_without_sqlite_or_before_django_5_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "DATABASES", {"default": _POSTGRES})
    assert check_sqlite_transaction_mode() == []
    if django.VERSION < (5, 1):  # no transaction_mode to recommend
        monkeypatch.setattr(settings, "DATABASES", {"default": _SQLITE})
        assert check_sqlite_transaction_mode() == []


# --------------------------------------------------------------------------- W004


def test_w004_many_long_polls_may_wait_under_wsgi() -> None:
    with override_settings(CHANGEFEED_SYNC_FEED_WSGI_WAITERS=5):
        messages = check_wsgi_long_polls()
    message = the_one(messages, "W004", checks.WARNING)
    assert "CHANGEFEED_SYNC_FEED_WSGI_WAITERS is 5" in message.msg
    assert "CHANGEFEED_SYNC_FEED_MAX_WAIT (30.0 s)" in message.msg
    assert message.hint is not None
    assert "ASGI" in message.hint and "'Deploying'" in message.hint


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the default, 2
        {"CHANGEFEED_SYNC_FEED_WSGI_WAITERS": 4},
        {"CHANGEFEED_SYNC_FEED_WSGI_WAITERS": 0},
        # No long-poll waits at all: nothing is held, however many may "wait".
        {"CHANGEFEED_SYNC_FEED_WSGI_WAITERS": 50, "CHANGEFEED_SYNC_FEED_MAX_WAIT": 0},
        # Wrong values are E133 / E107's business, not a second message.
        {"CHANGEFEED_SYNC_FEED_WSGI_WAITERS": "50"},
        {"CHANGEFEED_SYNC_FEED_WSGI_WAITERS": 50, "CHANGEFEED_SYNC_FEED_MAX_WAIT": "x"},
    ],
)
def test_w004_not_raised_for_a_few_waiters_or_no_waits(overrides: dict[str, Any]) -> None:
    with override_settings(**overrides):
        assert check_wsgi_long_polls() == []


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


@pytest.mark.django_db
def test_w004_is_bound_to_manage_py_check() -> None:
    with override_settings(CHANGEFEED_SYNC_FEED_WSGI_WAITERS=12):
        with pytest.raises(SystemCheckError, match=r"changefeed_sync\.W004"):
            call_command("check", databases=["default"], fail_level="WARNING")
