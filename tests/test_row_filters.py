"""Issue 14, first increment: a Target's row filters, how they are written and validated.

``changefeed_sync.filters.filter_problems`` (behind ``Target.clean()`` and the system
check E011) accepts Django field lookups through synced foreign keys to registered
models, ending at a synced column, with a value Django and the database accept; every
other filter gets one message naming the model and the lookup. A Hypothesis property
ties the validation to the ORM: what it accepts, SQLite runs.

The models below are registered only by the tests that need them (the
``clean_registry`` fixture unregisters them), as in tests/test_checks.py.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import pytest
from django.core import checks
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, connections, models
from django.db.models import Q
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import changefeed_sync
from changefeed_sync import registry
from changefeed_sync.checks import check_row_filters
from changefeed_sync.filters import (
    filter_problems,
    is_filtered,
    queryset_filter,
)
from changefeed_sync.models import Target, generate_secret
from tests.testapp.models import (
    Category,
    Copy,
    Country,
    Kinds,
    Language,
    Nation,
    Region,
    Tag,
)

# --------------------------------------------------------------------------- models
# app_label "testapp" so they live in an installed app; names start with "Rf".


class RfShelf(models.Model):
    code = models.CharField(max_length=10, unique=True)

    class Meta:
        app_label = "testapp"


class RfBook(models.Model):
    shelf = models.ForeignKey(RfShelf, on_delete=models.CASCADE, related_name="+")
    code = models.CharField(max_length=10, unique=True)
    title = models.CharField(max_length=50, default="")

    class Meta:
        app_label = "testapp"


# Unregisters whatever a test registered, even when it fails half-way (conftest.py).
pytestmark = pytest.mark.usefixtures("clean_registry")


#: The issue's example, on the test app's models.
ISSUE_EXAMPLE = {
    "testapp.copy": {"language__country__code__in": ["fr", "be"]},
    "testapp.country": {"code__in": ["fr", "be"]},
}


def the_one(row_filters: Any) -> str:
    problems = filter_problems(row_filters)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    "row_filters",
    [
        {},
        ISSUE_EXAMPLE,
        {"testapp.country": {}},  # named, not restricted
        {"TestApp.Country": {"code": "fr"}},  # labels are case-insensitive
        {"testapp.language": {"country__code": "fr", "code__in": ["fr", "br"]}},
        {"testapp.copy": {"language__country__name__in": ["France"], "key": "title"}},
        {"testapp.category": {"parent__parent__slug__startswith": "a"}},  # self-reference
        {"testapp.region": {"nation__capital_region__code__isnull": True}},
        {"testapp.nation": {"numeric__range": [1, 999], "name__icontains": "land"}},
        {"testapp.country": {"code__in": []}},  # nothing of this model
        {"testapp.country": {"name": None}},  # Django's "IS NULL"
        {"testapp.country": {"code__regex": "^(fr|be)$"}},
        {
            "testapp.kinds": {
                "when__gte": "2024-01-01T00:00:00Z",
                "day__lt": "2024-06-30",
                "dec__gt": "1.5",
                "uid": "12345678-1234-5678-1234-567812345678",
                "flag": True,
                "big__lte": 2**63 - 1,
                "color__in": ["red"],
                "doc__has_key": "a",
                "doc": {"a": [1, 2]},
            }
        },
    ],
)
def test_good_filters_have_no_problems(row_filters: Any) -> None:
    assert filter_problems(row_filters) == []


def test_a_registered_model_of_ones_own_can_be_filtered() -> None:
    changefeed_sync.register(RfShelf, natural_key=["code"])
    changefeed_sync.register(RfBook, natural_key=["code"])
    assert filter_problems({"testapp.rfbook": {"shelf__code": "a", "title": "b"}}) == []


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("row_filters", "words"),
    [
        # Not an object of label -> lookups.
        ([], ["row_filters must be an object", "[]"]),
        ("testapp.country", ["row_filters must be an object", "'testapp.country'"]),
        (None, ["row_filters must be an object", "None"]),
        ({"testapp.country": ["code"]}, ["testapp.country", "object of lookups", "['code']"]),
        ({"testapp.country": {5: "fr"}}, ["testapp.country", "lookup 5 is not a string"]),
        # Labels.
        ({"country": {"code": "fr"}}, ["'country' is not a model label"]),
        ({"shop.country": {"code": "fr"}}, ["'shop.country'", "no installed model"]),
        ({"testapp.nothing": {}}, ["'testapp.nothing'", "no installed model"]),
        ({"testapp.plain": {"code": "fr"}}, ["testapp.plain", "not registered"]),
        (
            {"testapp.country": {}, "TestApp.Country": {"code": "fr"}},
            ["'TestApp.Country'", "'testapp.country'", "case-insensitive"],
        ),
        # Fields.
        ({"testapp.country": {"nope": 1}}, ["testapp.country", "'nope'", "has no field"]),
        ({"testapp.copy": {"default": "x"}}, ["testapp.copy", "'default'", "not a synced field"]),
        (
            {"testapp.copy": {"tags__slug": "x"}},
            ["testapp.copy", "'tags__slug'", "many-to-many"],
        ),
        (
            {"testapp.country": {"languages__code": "fr"}},
            ["testapp.country", "'languages__code'", "reverse relation", "testapp.language"],
        ),
        (
            {"testapp.country": {"id": 1}},
            ["testapp.country", "'id'", "primary key", "'code'"],
        ),
        (
            {"testapp.country": {"pk__in": [1]}},
            ["testapp.country", "'pk__in'", "primary key"],
        ),
        (
            {"testapp.language": {"country_id": 1}},
            ["testapp.language", "'country_id'", "column of the foreign key", "'country__code'"],
        ),
        (
            {"testapp.copy": {"language__country_id__in": [1]}},
            ["testapp.copy", "'language__country_id__in'", "'language__country__code'"],
        ),
        (
            {"testapp.language": {"country": 1}},
            ["testapp.language", "'country'", "ends at the foreign key", "'country__code'"],
        ),
        (
            {"testapp.category": {"parent__isnull": True}},
            ["testapp.category", "'parent__isnull'", "ends at the foreign key", "'parent__slug'"],
        ),
        (
            {"testapp.language": {"country__nope": "x"}},
            ["testapp.language", "'country__nope'", "testapp.country has no field 'nope'"],
        ),
        # Lookup names.
        (
            {"testapp.country": {"code__frobnicate": "x"}},
            ["testapp.country", "'code__frobnicate'", "'frobnicate' is not a lookup"],
        ),
        (
            {"testapp.country": {"code__lower__exact": "x"}},
            ["testapp.country", "'code__lower__exact'", "only one lookup"],
        ),
        (
            {"testapp.kinds": {"when__year": 2024}},
            ["testapp.kinds", "'when__year'", "transform"],
        ),
        # Values.
        (
            {"testapp.country": {"code__in": "fr"}},
            ["testapp.country", "'code__in'", "value 'fr'", "must be a list"],
        ),
        (
            {"testapp.country": {"code__in": 5}},
            ["testapp.country", "'code__in'", "value 5", "must be a list"],
        ),
        (
            {"testapp.country": {"code__in": [["fr"]]}},
            ["testapp.country", "'code__in'", "[['fr']]", "only strings, numbers"],
        ),
        (
            {"testapp.country": {"code__isnull": "yes"}},
            ["testapp.country", "'code__isnull'", "value 'yes'", "True or False"],
        ),
        (
            {"testapp.country": {"code__isnull": None}},
            ["testapp.country", "'code__isnull'", "value None"],
        ),
        (
            {"testapp.country": {"code__range": ["a"]}},
            ["testapp.country", "'code__range'", "value ['a']", "two values"],
        ),
        (
            {"testapp.country": {"code__range": "ab"}},
            ["testapp.country", "'code__range'", "value 'ab'", "must be a list"],
        ),
        (
            {"testapp.country": {"code": {"a": 1}}},
            ["testapp.country", "'code'", "{'a': 1}", "only strings, numbers"],
        ),
        (
            {"testapp.country": {"code__gt": None}},
            ["testapp.country", "'code__gt'", "value None", "refused"],
        ),
        (
            {"testapp.kinds": {"when__gte": "yesterday"}},
            ["testapp.kinds", "'when__gte'", "'yesterday'", "format"],
        ),
        (
            {"testapp.kinds": {"big__in": [1, 2**64]}},
            ["testapp.kinds", "'big__in'", str(2**64), "database integer"],
        ),
        (
            {"testapp.kinds": {"ratio__gt": float("nan")}},
            ["testapp.kinds", "'ratio__gt'", "nan", "not a JSON number"],
        ),
        (
            {"testapp.country": {"name": "a\x00b"}},
            ["testapp.country", "'name'", "NUL"],
        ),
        (
            {"testapp.country": {"code__regex": "("}},
            ["testapp.country", "'code__regex'", "value '('", "not a regular expression"],
        ),
        (
            {"testapp.kinds": {"doc__contains": {"a": 1}}},  # SQLite has no JSON containment
            ["testapp.kinds", "'doc__contains'", "{'a': 1}", "not supported"],
        ),
    ],
)
def test_each_bad_filter_gets_one_message(row_filters: Any, words: list[str]) -> None:
    message = the_one(row_filters)
    for word in words:
        assert word in message, message


def test_a_long_value_is_cut_in_the_message() -> None:
    message = the_one({"testapp.country": {"code__in": "x" * 500}})
    assert "x" * 500 not in message
    assert "'" + "x" * 50 in message and "..." in message


def test_a_field_left_out_of_the_registration_is_refused() -> None:
    changefeed_sync.register(RfShelf, natural_key=["code"])
    changefeed_sync.register(RfBook, natural_key=["code"], exclude=["title"])
    message = the_one({"testapp.rfbook": {"title__startswith": "a"}})
    assert message == (
        "testapp.rfbook: lookup 'title__startswith': 'title' is not a synced field of "
        "testapp.rfbook."
    )


def test_a_path_through_a_relation_left_out_of_the_registration_is_refused() -> None:
    changefeed_sync.register(RfShelf, natural_key=["code"])
    changefeed_sync.register(RfBook, natural_key=["code"], exclude=["shelf"])
    message = the_one({"testapp.rfbook": {"shelf__code": "a"}})
    assert "testapp.rfbook" in message and "'shelf__code'" in message
    assert "'shelf' is not a synced field of testapp.rfbook" in message


def test_a_path_through_an_unregistered_model_is_refused() -> None:
    changefeed_sync.register(RfBook, natural_key=["code"])  # RfShelf is not registered
    message = the_one({"testapp.rfbook": {"shelf__code": "a"}})
    assert "testapp.rfbook" in message and "'shelf__code'" in message
    assert "testapp.rfshelf" in message and "not registered" in message


def test_every_problem_is_listed() -> None:
    problems = filter_problems(
        {
            "testapp.country": {"code__in": "fr", "nope": 1, "name": "France"},
            "testapp.plain": {"code": "fr"},
            "testapp.language": {"code": "fr"},
        }
    )
    assert len(problems) == 3
    assert problems[0].startswith("testapp.country: lookup 'code__in'")
    assert problems[1].startswith("testapp.country: lookup 'nope'")
    assert problems[2].startswith("testapp.plain is not registered")


# --------------------------------------------------------------------------- Target.clean()


@pytest.mark.django_db
def test_full_clean_refuses_bad_filters_under_row_filters() -> None:
    bad = {"testapp.country": {"nope": 1}, "testapp.copy": {"tags__slug": "x"}}
    target = Target(name="regional", secrets=generate_secret(), row_filters=bad)
    with pytest.raises(ValidationError) as info:
        target.full_clean()
    assert set(info.value.message_dict) == {"row_filters"}
    assert info.value.message_dict["row_filters"] == filter_problems(bad)

    target.row_filters = ISSUE_EXAMPLE
    target.full_clean()
    target.row_filters = {}  # the default: every row
    target.full_clean()


# --------------------------------------------------------------------------- E011

BAD = {"testapp.country": {"nope__in": ["fr"]}}


@pytest.mark.django_db
def test_e011_names_the_target_the_model_and_the_lookup() -> None:
    # Saved past clean(), as a data migration or the shell can.
    Target.objects.create(name="regional", secrets=generate_secret(), row_filters=BAD)
    Target.objects.create(name="everything", secrets=generate_secret())
    Target.objects.create(name="fine", secrets=generate_secret(), row_filters=ISSUE_EXAMPLE)
    messages = check_row_filters(databases=["default"])
    assert [m.id for m in messages] == ["changefeed_sync.E011"]
    message = messages[0]
    assert message.level == checks.ERROR
    assert message.msg == (
        "Target 'regional' (database 'default'): row_filters: testapp.country: "
        "lookup 'nope__in': testapp.country has no field 'nope'."
    )
    assert isinstance(message.obj, Target) and message.obj.name == "regional"
    assert message.hint is not None and "admin" in message.hint


@pytest.mark.django_db
def test_e011_follows_the_registrations() -> None:
    """Filters valid when saved become E011 when a registration changes under them."""
    changefeed_sync.register(RfShelf, natural_key=["code"])
    changefeed_sync.register(RfBook, natural_key=["code"])
    filters = {"testapp.rfbook": {"shelf__code": "a"}}
    Target.objects.create(name="regional", secrets=generate_secret(), row_filters=filters)
    assert check_row_filters(databases=["default"]) == []
    changefeed_sync.unregister(RfShelf)
    [message] = check_row_filters(databases=["default"])
    assert "Target 'regional'" in message.msg and "testapp.rfshelf" in message.msg


@pytest.mark.django_db
def test_e011_is_bound_to_manage_py_check_with_a_database() -> None:
    Target.objects.create(name="regional", secrets=generate_secret(), row_filters=BAD)
    with pytest.raises(SystemCheckError, match=r"changefeed_sync\.E011.*'regional'"):
        call_command("check", databases=["default"])


def test_e011_reads_no_database_without_aliases() -> None:
    # No django_db mark: a query here would fail the test.
    assert check_row_filters() == []
    assert check_row_filters(databases=None) == []
    assert check_row_filters(databases=[]) == []


# All databases: Django 6.1's model checks ask each of them about JSONField support.
@pytest.mark.django_db(databases="__all__")
def test_a_bare_check_does_not_read_the_targets() -> None:
    assert checks.Tags.database in check_row_filters.tags  # type: ignore[attr-defined]
    Target.objects.create(name="regional", secrets=generate_secret(), row_filters=BAD)
    with ExitStack() as stack:
        captured = [stack.enter_context(CaptureQueriesContext(c)) for c in connections.all()]
        messages = checks.run_checks()
    assert "changefeed_sync.E011" not in {m.id for m in messages}
    table = Target._meta.db_table
    assert not [q["sql"] for c in captured for q in c.captured_queries if table in q["sql"]]


@pytest.mark.django_db
def test_e011_passes_over_a_database_before_migrate() -> None:
    """Before migrate has added the row_filters column (or made the table), as when
    ``migrate`` runs the checks: no message and no error. (The test's transaction
    undoes the renaming if an assertion fails half-way.)"""
    Target.objects.create(name="regional", secrets=generate_secret(), row_filters=BAD)
    table = connection.ops.quote_name(Target._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME COLUMN row_filters TO row_filters_later")
    assert check_row_filters(databases=["default"]) == []
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME COLUMN row_filters_later TO row_filters")
    # The failed read was rolled back on its own: the connection reads on.
    assert len(check_row_filters(databases=["default"])) == 1


@pytest.mark.django_db
def test_e011_skips_aliases_it_does_not_know() -> None:
    Target.objects.create(name="regional", secrets=generate_secret(), row_filters=BAD)
    assert check_row_filters(databases=["nowhere"]) == []


# --------------------------------------------------------------------------- W005

NARROW = {"name": "regional", "model_labels": ["testapp.country"]}


@pytest.mark.django_db
def test_clean_refuses_a_filter_of_a_model_the_target_does_not_receive() -> None:
    target = Target(secrets=generate_secret(), row_filters=ISSUE_EXAMPLE, **NARROW)
    with pytest.raises(ValidationError) as info:
        target.full_clean()
    [message] = info.value.message_dict["row_filters"]
    assert message.startswith("testapp.copy has a filter, but this Target does not receive")
    assert "testapp.country" in message  # its models, named
    target.model_labels = ["testapp.country", "TestApp.Copy"]  # case-insensitive
    target.full_clean()
    target.model_labels = []  # every model
    target.full_clean()


@pytest.mark.django_db
def test_w005_names_the_target_and_the_model_left_out() -> None:
    from changefeed_sync.checks import check_filtered_models_received

    Target.objects.create(secrets=generate_secret(), row_filters=ISSUE_EXAMPLE, **NARROW)
    Target.objects.create(name="everything", secrets=generate_secret(), row_filters=ISSUE_EXAMPLE)
    assert check_filtered_models_received() == []  # no database named: nothing read
    [message] = check_filtered_models_received(databases=["default"])
    assert message.id == "changefeed_sync.W005" and message.level == checks.WARNING
    assert message.msg.startswith("Target 'regional' (database 'default'): row_filters: ")
    assert "testapp.copy has a filter, but this Target does not receive" in message.msg
    assert message.hint is not None and "admin" in message.hint
    assert isinstance(message.obj, Target) and message.obj.name == "regional"
    # Bound: what ``manage.py check --database default`` runs.
    assert "changefeed_sync.W005" in {m.id for m in checks.run_checks(databases=["default"])}
    Target.objects.filter(name="regional").update(model_labels=["testapp.country", "testapp.copy"])
    assert check_filtered_models_received(databases=["default"]) == []


# --------------------------------------------------------------------------- is_filtered


@pytest.mark.parametrize(
    ("row_filters", "filtered"),
    [
        ({}, False),
        ({"testapp.country": {}}, False),
        ({"testapp.country": {}, "testapp.copy": {}}, False),
        ({"testapp.country": {"code": "fr"}}, True),
        ({"testapp.country": {}, "testapp.copy": {"key": "x"}}, True),
        # Not readable as filters: counted as filtering, so that nothing is sent.
        ([], True),
        (None, True),
        ("", True),
        ({"testapp.country": []}, True),
        ({"testapp.country": None}, True),
    ],
)
def test_is_filtered(row_filters: Any, filtered: bool) -> None:
    assert is_filtered(row_filters) is filtered


# --------------------------------------------------------------------------- queryset_filter


def test_queryset_filter_gives_each_model_its_q() -> None:
    assert queryset_filter(ISSUE_EXAMPLE, "testapp.country") == Q(code__in=["fr", "be"])
    assert queryset_filter(ISSUE_EXAMPLE, "TestApp.Country") == Q(code__in=["fr", "be"])
    assert queryset_filter(ISSUE_EXAMPLE, "testapp.language") is None
    assert queryset_filter({"testapp.language": {}}, "testapp.language") is None
    assert queryset_filter({}, "testapp.language") is None


@pytest.mark.parametrize("row_filters", [[], None, {"testapp.country": ["code"]}])
def test_queryset_filter_refuses_what_it_cannot_read(row_filters: Any) -> None:
    with pytest.raises(ValueError):
        queryset_filter(row_filters, "testapp.country")


@pytest.mark.django_db
def test_queryset_filter_selects_the_rows() -> None:
    for code in ("fr", "be", "de"):
        country = Country.objects.create(code=code)
        language = Language.objects.create(country=country, code=code)
        Copy.objects.create(language=language, key="title", value=code)
    countries = Country.objects.filter(queryset_filter(ISSUE_EXAMPLE, "testapp.country"))
    assert sorted(c.code for c in countries) == ["be", "fr"]
    copies = Copy.objects.filter(queryset_filter(ISSUE_EXAMPLE, "testapp.copy"))
    assert sorted(c.value for c in copies) == ["be", "fr"]


# --------------------------------------------------------------------------- property

MODELS: list[type[models.Model]] = [Country, Language, Copy, Tag, Category, Kinds, Nation, Region]
#: Path parts a filter may not use, mixed in with the synced paths.
BAD_PATHS = ["id", "pk", "tags", "languages", "country_id", "language", "nope", "", "default"]
LOOKUP_NAMES = [
    None,
    "exact",
    "iexact",
    "in",
    "gt",
    "gte",
    "lt",
    "lte",
    "startswith",
    "istartswith",
    "endswith",
    "iendswith",
    "contains",
    "icontains",
    "isnull",
    "range",
    "regex",
    "iregex",
    "year",
    "date",
    "lower",
    "frobnicate",
    "has_key",
    "has_keys",
    "contained_by",
    "key__exact",
]
SAMPLES = [
    "fr",
    "be",
    "2024-01-01",
    "2024-01-01T00:00:00Z",
    "1 day",
    "12345678-1234-5678-1234-567812345678",
    "(",
    "^f",
    "red",
    "1.5",
    "true",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(SAMPLES)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=5,
)


def values_for(name: str | None) -> st.SearchStrategy[Any]:
    """Mostly the shape the lookup takes (so that many filters pass), sometimes any JSON."""
    shaped = {
        "in": st.lists(SCALARS, max_size=3),
        "range": st.lists(SCALARS, min_size=2, max_size=2),
        "isnull": st.booleans(),
    }.get(name or "", SCALARS)
    return st.one_of(shaped, shaped, shaped, JSON)


def synced_paths(model: type[models.Model], depth: int = 2) -> list[str]:
    """Paths to every synced column of ``model``, through synced foreign keys to
    registered models, ``depth`` hops at most."""
    options = registry.get_options(model)
    assert options is not None
    found: list[str] = []
    for f in options.concrete_fields:
        if not f.is_relation:
            found.append(f.name)
        elif depth and registry.get_options(f.related_model):  # type: ignore[arg-type]
            found += [f"{f.name}__{p}" for p in synced_paths(f.related_model, depth - 1)]  # type: ignore[arg-type]
    return found


@st.composite
def model_filters(draw: st.DrawFn) -> tuple[type[models.Model], dict[str, Any]]:
    model = draw(st.sampled_from(MODELS))
    lookups: dict[str, Any] = {}
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        path = draw(st.sampled_from(synced_paths(model)) | st.sampled_from(BAD_PATHS))
        name = draw(st.sampled_from(LOOKUP_NAMES[:17]) | st.sampled_from(LOOKUP_NAMES))
        lookups[path if name is None else f"{path}__{name}"] = draw(values_for(name))
    return model, lookups


@pytest.fixture
def rows() -> None:
    """A row of every model, so that the filters' SQL meets values (SQLite's REGEXP,
    JSON functions and casts run per row)."""
    import datetime
    import uuid

    country = Country.objects.create(code="fr", name="France")
    language = Language.objects.create(country=country, code="fr", name="French")
    copy = Copy.objects.create(language=language, key="title", value="Bonjour")
    copy.tags.add(Tag.objects.create(slug="greeting"))
    top = Category.objects.create(slug="top")
    Category.objects.create(slug="child", parent=top)
    Kinds.objects.create(
        slug="k",
        big=2**40,
        dec="1.5",
        when=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
        day=datetime.date(2024, 1, 1),
        uid=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        blob=b"\x00\x01",
        doc={"a": [1, 2], "b": None},
        flag=True,
        ratio=0.5,
        span=datetime.timedelta(days=1),
    )
    nation = Nation.objects.create(code="fr", alpha_3="fra", numeric=250, name="France")
    region = Region.objects.create(nation=nation, code="idf", name="Ile-de-France")
    Region.objects.create(nation=nation, code="75", parent=region)
    nation.capital_region = region
    nation.save()


@pytest.mark.django_db
def test_what_is_accepted_runs_on_sqlite(rows: None) -> None:
    accepted: list[dict[str, Any]] = []

    @settings(
        max_examples=300,
        derandomize=True,  # the same examples on every run
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(model_filters())
    def accepted_filters_run(drawn: tuple[type[models.Model], dict[str, Any]]) -> None:
        model, lookups = drawn
        label = model._meta.label_lower
        problems = filter_problems({label: lookups})  # never raises
        assert all(isinstance(p, str) and p.startswith(f"{label}: lookup ") for p in problems)
        if problems:
            return
        accepted.append(lookups)
        list(model._base_manager.filter(**lookups)[:1])
        q = queryset_filter({label: lookups}, label)
        assert q is not None
        list(model._base_manager.filter(q)[:1])

    accepted_filters_run()
    assert len(accepted) >= 30, "too few accepted filters: the property says little"
