"""Registration: register()/register_model(), misuse errors, unregister(), field selection,
and compatibility with models written for django-data-sync.

The models below are registered only inside tests; the ``clean_registry`` fixture
unregisters them again, so the rest of the suite is not affected.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import models
from django.test.utils import isolate_apps

import changefeed_sync
from changefeed_sync import registry
from changefeed_sync.checks import check_registered_models
from changefeed_sync.exceptions import RegistrationError
from changefeed_sync.managers import DataSyncEnhancedManager
from changefeed_sync.models import Event
from tests.testapp.models import Copy, Country

# --------------------------------------------------------------------------- models
# app_label "testapp" (an app without migrations) so the test databases get their tables.


class RegWidget(models.Model):
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=50, default="")
    note = models.CharField(max_length=50, default="")

    class Meta:
        app_label = "testapp"


class RegRekeyed(models.Model):
    """Registered in one test only, first with one natural key, then with another."""

    slug = models.SlugField(unique=True)
    code = models.CharField(max_length=10, unique=True)
    name = models.CharField(max_length=50, default="")

    class Meta:
        app_label = "testapp"


class RegCountry(models.Model):
    """Written as for django-data-sync: its manager, its decorator (applied in the test)."""

    code = models.CharField(max_length=2, unique=True)
    name = models.CharField(max_length=50, default="")

    objects = DataSyncEnhancedManager()

    class Meta:
        app_label = "testapp"


class RegCity(models.Model):
    country = models.ForeignKey(RegCountry, on_delete=models.CASCADE)
    code = models.CharField(max_length=10)
    name = models.CharField(max_length=50, default="")
    population = models.IntegerField(default=0)
    photo = models.FileField(upload_to="reg/", blank=True)

    objects = DataSyncEnhancedManager()

    class Meta:
        app_label = "testapp"
        unique_together = [("country", "code")]


class RegOwnKeyManager(models.Manager["RegOwnKey"]):
    def get_by_natural_key(self, slug: str) -> RegOwnKey:
        # Deliberately not what changefeed_sync would do (an exact lookup).
        return self.get(slug__iexact=slug)


class RegOwnKey(models.Model):
    """Already speaks Django's natural key protocol; registration must not replace it."""

    slug = models.SlugField(unique=True)

    objects = RegOwnKeyManager()

    class Meta:
        app_label = "testapp"

    def natural_key(self) -> tuple[str]:
        return (f"own:{self.slug}",)


# Unregisters whatever a test registered, even when it fails half-way (conftest.py).
pytestmark = pytest.mark.usefixtures("clean_registry")


def widget_events() -> list[Event]:
    return list(Event.objects.filter(model="testapp.regwidget").order_by("id"))


# --------------------------------------------------------------------------- two forms


def test_register_as_a_function() -> None:
    assert not changefeed_sync.is_registered(RegWidget)
    returned = changefeed_sync.register(RegWidget, natural_key=["slug"])
    assert returned is RegWidget
    assert changefeed_sync.is_registered(RegWidget)
    assert RegWidget in changefeed_sync.get_registered_models()
    options = registry.get_options(RegWidget)
    assert options is not None
    assert options.natural_key == ("slug",)
    assert options.label == "testapp.regwidget"


def test_register_model_as_a_decorator() -> None:
    with isolate_apps("tests.testapp"):

        @changefeed_sync.register_model(natural_key=["slug"], fields=("title",))
        class RegDecorated(models.Model):
            slug = models.SlugField(unique=True)
            title = models.CharField(max_length=50)

            class Meta:
                app_label = "testapp"

    # The decorator hands back the class itself, not a wrapper.
    assert isinstance(RegDecorated, type) and issubclass(RegDecorated, models.Model)
    assert RegDecorated._meta.get_field("title").name == "title"
    options = registry.get_options(RegDecorated)
    assert options is not None
    assert (options.natural_key, options.fields) == (("slug",), ("title",))


@pytest.mark.django_db
def test_registered_model_captures_writes() -> None:
    changefeed_sync.register(RegWidget, natural_key=["slug"])
    RegWidget.objects.create(slug="a", name="A")
    assert [(e.op, e.key) for e in widget_events()] == [("upsert", ["a"])]


# --------------------------------------------------------------------------- misuse


def test_registering_twice_raises() -> None:
    options = registry.get_options(Country)
    with pytest.raises(RegistrationError, match=r"testapp\.Country is already registered"):
        changefeed_sync.register(Country, natural_key=["name"])
    assert registry.get_options(Country) is options  # the first registration stands

    changefeed_sync.register(RegWidget, natural_key=["slug"])
    with pytest.raises(RegistrationError, match="already registered"):
        changefeed_sync.register_model(natural_key=["slug"])(RegWidget)


@pytest.mark.parametrize(
    "thing",
    [object, "testapp.RegWidget", RegWidget(slug="x"), None, int],
    ids=["class", "string", "instance", "none", "int"],
)
def test_registering_a_non_model_raises(thing: Any) -> None:
    with pytest.raises(RegistrationError, match="not a Django model class"):
        changefeed_sync.register(thing, natural_key=["slug"])


def test_registering_an_abstract_model_raises() -> None:
    class RegAbstract(models.Model):
        slug = models.SlugField(unique=True)

        class Meta:
            abstract = True
            app_label = "testapp"

    with pytest.raises(RegistrationError, match="RegAbstract is abstract"):
        changefeed_sync.register(RegAbstract, natural_key=["slug"])
    assert not changefeed_sync.is_registered(RegAbstract)


@pytest.mark.parametrize("key", [[], ()])
def test_empty_natural_key_raises(key: Any) -> None:
    with pytest.raises(RegistrationError, match=r"testapp\.RegWidget: natural_key must name"):
        changefeed_sync.register(RegWidget, natural_key=key)
    assert not changefeed_sync.is_registered(RegWidget)


@pytest.mark.parametrize("arg", ["natural_key", "fields", "exclude", "file_fields"])
def test_a_string_instead_of_a_list_raises(arg: str) -> None:
    kwargs: dict[str, Any] = {"natural_key": ["slug"], arg: "slug"}
    with pytest.raises(RegistrationError, match=f"{arg} must be a list or tuple.*'slug'"):
        changefeed_sync.register(RegWidget, **kwargs)
    # A failed registration leaves nothing behind: registering properly still works.
    assert not changefeed_sync.is_registered(RegWidget)
    changefeed_sync.register(RegWidget, natural_key=["slug"])


# --------------------------------------------------------------------------- unregister


@pytest.mark.django_db
def test_unregister_stops_capture() -> None:
    changefeed_sync.register(RegWidget, natural_key=["slug"])
    widget = RegWidget.objects.create(slug="a")
    assert len(widget_events()) == 1

    changefeed_sync.unregister(RegWidget)
    assert not changefeed_sync.is_registered(RegWidget)
    assert registry.get_options(RegWidget) is None
    widget.name = "changed"
    widget.save()
    RegWidget.objects.create(slug="b")
    RegWidget.objects.bulk_create([RegWidget(slug="c")])
    RegWidget.objects.filter(slug="c").update(name="C")
    RegWidget.objects.filter(slug="b").delete()
    widget.delete()
    assert len(widget_events()) == 1
    assert RegWidget.objects.count() == 1  # the writes themselves happened


@pytest.mark.django_db
def test_register_again_after_unregister_captures_again() -> None:
    changefeed_sync.register(RegWidget, natural_key=["slug"])
    changefeed_sync.unregister(RegWidget)
    changefeed_sync.register(RegWidget, natural_key=["slug"])
    widget = RegWidget.objects.create(slug="a")
    widget.name = "A"
    widget.save()
    got = [(e.op, e.key, e.changed) for e in widget_events()]
    assert got == [("upsert", ["a"], ["name", "note", "slug"]), ("upsert", ["a"], ["name"])]


@pytest.mark.django_db
def test_register_again_with_another_natural_key_tracks_renames_of_the_new_key() -> None:
    """A rename of the natural key must carry old_key, or the target keeps the old row.

    The first registration tracks only the fields it syncs; registering again with a
    different key must track the new key's fields too.
    """
    changefeed_sync.register(RegRekeyed, natural_key=["slug"], fields=["name"])
    changefeed_sync.unregister(RegRekeyed)
    changefeed_sync.register(RegRekeyed, natural_key=["code"])
    row = RegRekeyed.objects.create(slug="s", code="c1")
    row.code = "c2"
    row.save()
    last = Event.objects.filter(model="testapp.regrekeyed").order_by("id").last()
    assert last is not None
    assert (last.key, last.old_key, last.changed) == (["c2"], ["c1"], ["code"])


def test_unregister_an_unregistered_model_raises() -> None:
    with pytest.raises(RegistrationError, match=r"testapp\.RegWidget is not registered"):
        changefeed_sync.unregister(RegWidget)
    changefeed_sync.register(RegWidget, natural_key=["slug"])
    changefeed_sync.unregister(RegWidget)
    with pytest.raises(RegistrationError, match="not registered"):
        changefeed_sync.unregister(RegWidget)


# --------------------------------------------------------------------------- fields=


def test_fields_limits_the_synced_field_names() -> None:
    changefeed_sync.register(RegWidget, natural_key=["slug"], fields=["name"])
    options = registry.get_options(RegWidget)
    assert options is not None
    # The natural key's fields are always synced: the target needs them to find the row.
    assert options.field_names == frozenset({"slug", "name"})

    changefeed_sync.unregister(RegWidget)
    changefeed_sync.register(RegWidget, natural_key=["slug"], exclude=["note"])
    options = registry.get_options(RegWidget)
    assert options is not None
    assert options.field_names == frozenset({"slug", "name"})

    changefeed_sync.unregister(RegWidget)
    changefeed_sync.register(RegWidget, natural_key=["slug"])
    options = registry.get_options(RegWidget)
    assert options is not None
    assert options.field_names == frozenset({"slug", "name", "note"})  # never the pk

    copy = registry.get_options(Copy)
    assert copy is not None
    assert copy.field_names == frozenset({"language", "key", "value", "tags"})


@pytest.mark.django_db
def test_fields_limits_the_event_data() -> None:
    changefeed_sync.register(RegWidget, natural_key=["slug"], fields=["name"])
    widget = RegWidget.objects.create(slug="a", name="A", note="private")
    widget.note = "still private"
    widget.name = "B"
    widget.save()
    created, updated = widget_events()
    assert created.data == {"slug": "a", "name": "A"}
    assert updated.data == {"slug": "a", "name": "B"}
    assert updated.changed == ["name"]
    assert "private" not in str(created.data) + str(updated.data)


# --------------------------------------------------------------------------- django-data-sync compat


def _register_like_django_data_sync() -> None:
    # The decorator exactly as django-data-sync users wrote it.
    changefeed_sync.register_model(natural_key=["code"], fields=("name",))(RegCountry)
    changefeed_sync.register_model(
        natural_key=["country.code", "code"], fields=("name",), file_fields=("photo",)
    )(RegCity)


@pytest.mark.django_db
def test_data_sync_enhanced_manager_get_by_natural_key() -> None:
    _register_like_django_data_sync()
    assert isinstance(RegCity.objects, DataSyncEnhancedManager)
    fr = RegCountry.objects.create(code="fr", name="France")
    de = RegCountry.objects.create(code="de", name="Germany")
    paris = RegCity.objects.create(country=fr, code="par", name="Paris")
    RegCity.objects.create(country=de, code="par", name="Not Paris")

    assert RegCountry.objects.get_by_natural_key("fr") == fr
    assert RegCity.objects.get_by_natural_key("fr", "par") == paris
    assert RegCity._default_manager.get_by_natural_key("de", "par").name == "Not Paris"
    with pytest.raises(RegCity.DoesNotExist):
        RegCity.objects.get_by_natural_key("fr", "lyo")
    with pytest.raises(ValueError):
        RegCity.objects.get_by_natural_key("fr")  # one value short of the key


def test_data_sync_enhanced_manager_on_unregistered_model_raises() -> None:
    with pytest.raises(RegistrationError, match=r"testapp\.RegCity is not registered"):
        RegCity.objects.get_by_natural_key("fr", "par")


@pytest.mark.django_db
def test_data_sync_style_registration_passes_checks_and_syncs_declared_fields() -> None:
    _register_like_django_data_sync()
    assert [e for e in check_registered_models() if e.obj in (RegCountry, RegCity)] == []
    city_options = registry.get_options(RegCity)
    assert city_options is not None
    assert city_options.field_names == frozenset({"country", "code", "name", "photo"})

    fr = RegCountry.objects.create(code="fr", name="France")
    RegCity.objects.create(country=fr, code="par", name="Paris", population=2_100_000)
    event = Event.objects.get(model="testapp.regcity")
    assert event.key == ["fr", "par"]
    assert event.data == {"country": ["fr"], "code": "par", "name": "Paris", "photo": ""}


@pytest.mark.django_db
def test_own_natural_key_methods_are_kept() -> None:
    own_method = RegOwnKey.__dict__["natural_key"]
    own_manager = RegOwnKey._default_manager
    changefeed_sync.register(RegOwnKey, natural_key=["slug"])

    assert RegOwnKey.__dict__["natural_key"] is own_method
    assert RegOwnKey._default_manager is own_manager
    assert type(RegOwnKey.objects) is RegOwnKeyManager
    row = RegOwnKey.objects.create(slug="alpha")
    assert row.natural_key() == ("own:alpha",)
    # The model's own lookup (case-insensitive), not an exact one on the registered key.
    assert RegOwnKey.objects.get_by_natural_key("ALPHA") == row
    event = Event.objects.get(model="testapp.regownkey")
    assert event.key == ["alpha"]  # the feed uses the registered key
