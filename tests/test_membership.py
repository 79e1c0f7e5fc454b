"""Issue 14, routing's foundation: which filtered Targets a row belongs to
(``source/membership.members``) and which rows a write to a parent can move
(``filter_paths``, ``dependents_of``, ``dependent_pks``).

The property, on SQLite, PostgreSQL and MariaDB: for random countries, languages and
copies and up to three saved Targets with random valid filters, ``members`` of every
row is, for each Target, exactly whether ``Model.objects.filter(**lookups)`` returns
that row (the ORM alone decides the expectation; the code under test answers with one
annotated query per chunk).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import models, transaction
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from changefeed_sync import registry
from changefeed_sync.filters import filter_problems
from changefeed_sync.models import Target
from changefeed_sync.registry import ModelOptions
from changefeed_sync.source import membership
from changefeed_sync.source.membership import Dependent
from tests.test_row_filters_snapshot import ROWS, a_filter, create
from tests.testapp.models import Copy, Country, Language

pytestmark = pytest.mark.django_db(databases="__all__")

SECRET = ["test-secret-not-real"]
REGIONAL = {
    "testapp.country": {"code__in": ["fr", "be"]},
    "testapp.language": {"country__code__in": ["fr", "be"]},
    "testapp.copy": {"language__country__code__in": ["fr", "be"], "value__startswith": "pub"},
}


def _options(model: type[models.Model]) -> ModelOptions:
    options = registry.get_options(model)
    assert options is not None
    return options


def _world(alias: str) -> dict[str, Any]:
    fr = Country.objects.using(alias).create(code="fr", name="France")
    de = Country.objects.using(alias).create(code="de", name="Germany")
    fr_fr = Language.objects.using(alias).create(country=fr, code="fr")
    de_de = Language.objects.using(alias).create(country=de, code="de")
    copies = {
        name: Copy.objects.using(alias).create(language=language, key=name, value=value)
        for name, language, value in [
            ("fr-pub", fr_fr, "pub: bonjour"),
            ("fr-draft", fr_fr, "draft"),
            ("de-pub", de_de, "pub: hallo"),
        ]
    }
    return {"fr": fr, "de": de, "fr_fr": fr_fr, "de_de": de_de, **copies}


def test_members_are_the_rows_each_targets_filters_select(db_alias: str) -> None:
    w = _world(db_alias)
    regional = Target.objects.using(db_alias).create(
        name="regional", secrets=SECRET, row_filters=REGIONAL
    )
    # Filters only countries: every language and copy, a country only when named.
    german = Target.objects.using(db_alias).create(
        name="german", secrets=SECRET, row_filters={"testapp.country": {"code": "de"}}
    )
    Target.objects.using(db_alias).create(name="everything", secrets=SECRET)
    Target.objects.using(db_alias).create(
        name="inactive", secrets=SECRET, row_filters=REGIONAL, active=False
    )
    readers = membership.readers(db_alias)
    assert [r.target_id for r in readers] == [regional.pk, german.pk]
    copies = [w["fr-pub"].pk, w["fr-draft"].pk, w["de-pub"].pk]
    got = membership.members(_options(Copy), [*copies, 10**9], db_alias, readers)
    assert got == {
        w["fr-pub"].pk: {regional.pk, german.pk},
        w["fr-draft"].pk: {german.pk},
        w["de-pub"].pk: {german.pk},
    }  # the missing row belongs to none: not in the answer
    countries = membership.members(_options(Country), [w["fr"].pk, w["de"].pk], db_alias, readers)
    assert countries == {w["fr"].pk: {regional.pk}, w["de"].pk: {german.pk}}


def test_a_target_with_invalid_saved_filters_is_a_member_of_nothing(db_alias: str) -> None:
    w = _world(db_alias)
    broken = Target.objects.using(db_alias).create(name="broken", secrets=SECRET)
    # Saved past Target.clean() (E011): routing must fail closed.
    Target.objects.using(db_alias).filter(pk=broken.pk).update(
        row_filters={"testapp.country": {"nope": 1}}
    )
    readers = membership.readers(db_alias)
    assert [(r.target_id, r.selection) for r in readers] == [(broken.pk, None)]
    got = membership.members(_options(Country), [w["fr"].pk, w["de"].pk], db_alias, readers)
    assert got == {w["fr"].pk: frozenset(), w["de"].pk: frozenset()}


def test_a_target_restricted_to_some_models_is_a_member_of_those_only(db_alias: str) -> None:
    w = _world(db_alias)
    target = Target.objects.using(db_alias).create(
        name="countries-only",
        secrets=SECRET,
        model_labels=["testapp.country"],
        row_filters={"testapp.country": {"code": "fr"}},
    )
    readers = membership.readers(db_alias)
    assert membership.members(_options(Country), [w["fr"].pk], db_alias, readers) == {
        w["fr"].pk: {target.pk}
    }
    assert membership.members(_options(Language), [w["fr_fr"].pk], db_alias, readers) == {
        w["fr_fr"].pk: frozenset()
    }


def test_the_paths_by_which_a_parent_write_moves_rows(db_alias: str) -> None:
    w = _world(db_alias)
    Target.objects.using(db_alias).create(name="regional", secrets=SECRET, row_filters=REGIONAL)
    readers = membership.readers(db_alias)
    assert membership.filter_paths(readers) == [
        Dependent("testapp.copy", "language__country", "testapp.country", "code"),
        Dependent("testapp.language", "country", "testapp.country", "code"),
        Dependent("testapp.copy", "language", "testapp.language", "country"),
    ]
    country = _options(Country)
    # A country's name is read by no filter; its code by two paths; a new or deleted
    # country (changed=None) by both.
    assert membership.dependents_of(country, ["name"], readers) == []
    by_code = membership.dependents_of(country, ["code"], readers)
    assert [(d.child, d.via) for d in by_code] == [
        ("testapp.copy", "language__country"),
        ("testapp.language", "country"),
    ]
    assert membership.dependents_of(country, None, readers) == by_code
    assert [d.field for d in membership.dependents_of(_options(Language), None, readers)] == [
        "country"
    ]
    to_copies = by_code[0]
    assert membership.dependent_pks(to_copies, [w["fr"].pk], db_alias) == sorted(
        [w["fr-pub"].pk, w["fr-draft"].pk]
    )
    assert membership.dependent_pks(to_copies, [w["de"].pk, w["fr"].pk], db_alias) == sorted(
        [w["fr-pub"].pk, w["fr-draft"].pk, w["de-pub"].pk]
    )
    assert membership.dependent_pks(by_code[1], [w["de"].pk], db_alias) == [w["de_de"].pk]


FILTERS = st.lists(a_filter(), min_size=1, max_size=3)


def test_members_agree_with_the_orm_for_any_rows_and_filters(db_alias: str) -> None:
    seen: list[tuple[int, int]] = []

    @settings(
        max_examples=60,
        derandomize=True,  # the same examples on every run
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
        ],
    )
    @given(ROWS, FILTERS)
    def agree(drawn: dict[str, Any], chosen: list[tuple[type[models.Model], Any]]) -> None:
        for model, lookups in chosen:
            assume(not filter_problems({model._meta.label_lower: lookups}))
        with transaction.atomic(using=db_alias):
            create(db_alias, drawn)
            targets = [
                Target.objects.using(db_alias).create(
                    name=f"t{i}", secrets=SECRET, row_filters={model._meta.label_lower: lookups}
                )
                for i, (model, lookups) in enumerate(chosen)
            ]
            readers = membership.readers(db_alias)
            for model in (Country, Language, Copy):
                pks = list(model._base_manager.using(db_alias).values_list("pk", flat=True))
                got = membership.members(_options(model), pks, db_alias, readers)
                expected: dict[Any, set[int]] = {pk: set() for pk in pks}
                for target, (filtered, lookups) in zip(targets, chosen, strict=True):
                    if filtered is model:
                        chosen_pks = model._base_manager.using(db_alias).filter(**lookups)
                        for pk in chosen_pks.values_list("pk", flat=True):
                            expected[pk].add(target.pk)
                    else:  # the target reads this model whole
                        for pk in pks:
                            expected[pk].add(target.pk)
                assert got == expected, (model, chosen)
                filtered_here = [t for t, (m, _) in zip(targets, chosen, strict=True) if m is model]
                for target in filtered_here:
                    kept = sum(1 for v in expected.values() if target.pk in v)
                    seen.append((kept, len(pks)))
            transaction.set_rollback(True, using=db_alias)

    agree()
    # Not only empty or whole selections: the property met rows kept and dropped.
    assert sum(1 for kept, total in seen if 0 < kept < total) >= 8, seen
