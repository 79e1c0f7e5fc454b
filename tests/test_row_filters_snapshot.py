"""Issue 14: a filtered Target's snapshot holds exactly the rows its filters select.

A Hypothesis property on SQLite, PostgreSQL and MariaDB: for random rows of countries,
languages and copies and a random filter that ``filter_problems`` accepts (a lookup
on the row's own field or through its parents), the snapshot's start counts, its pages
and its bucket digests, served for a Target with that filter, are those of the rows
``Model.objects.filter(**lookups)`` returns. No HTTP: snapshot.py is what the view
answers with (tests/test_row_filters_pull.py pulls through a live server).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import models, transaction
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from changefeed_sync import registry
from changefeed_sync.digests import DigestPage, canonical_key, canonical_row
from changefeed_sync.filters import filter_problems
from changefeed_sync.models import Target
from changefeed_sync.selection import Selection
from changefeed_sync.serialization import payloads_from_db
from changefeed_sync.source import snapshot
from tests.test_row_filters import synced_paths
from tests.testapp.models import Copy, Country, Language

pytestmark = pytest.mark.django_db(databases="__all__")

# Values that neither collide under MariaDB's case- and pad-insensitive collations nor
# pass the columns' lengths, shared by rows and filters so that filters meet them.
CODES = ["fr", "be", "de", "f", "b", "fb"]
TEXTS = ["France", "fr", "Fr", "be", "", "pub", "pub fr", "draft", "^f", "1.5", "Ω"]
LOOKUPS = [None, "exact", "iexact", "in", "gt", "gte", "lt", "lte", "startswith",
           "istartswith", "endswith", "iendswith", "contains", "icontains", "isnull",
           "range"]  # fmt: skip
MODELS: list[type[models.Model]] = [Country, Language, Copy]
VALUES = st.sampled_from(CODES + TEXTS)


def value_for(name: str | None) -> st.SearchStrategy[Any]:
    if name == "in":
        return st.lists(VALUES, max_size=3)
    if name == "range":
        return st.lists(VALUES, min_size=2, max_size=2)
    if name == "isnull":
        return st.booleans()
    return VALUES


@st.composite
def a_filter(draw: st.DrawFn) -> tuple[type[models.Model], dict[str, Any]]:
    model = draw(st.sampled_from(MODELS))
    lookups: dict[str, Any] = {}
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        path = draw(st.sampled_from(synced_paths(model)))
        name = draw(st.sampled_from(LOOKUPS))
        lookups[path if name is None else f"{path}__{name}"] = draw(value_for(name))
    return model, lookups


ROWS = st.fixed_dictionaries(
    {
        "countries": st.lists(
            st.tuples(st.sampled_from(CODES), st.sampled_from(TEXTS)), max_size=5
        ),
        "languages": st.lists(
            st.tuples(st.integers(0, 4), st.sampled_from(CODES), st.sampled_from(TEXTS)),
            min_size=2,
            max_size=7,
        ),
        "copies": st.lists(
            st.tuples(st.integers(0, 6), st.sampled_from(CODES), st.sampled_from(TEXTS)),
            max_size=10,
        ),
    }
)


def create(alias: str, drawn: dict[str, Any]) -> None:
    """The drawn rows (pairs a unique constraint forbids left out)."""
    countries = {}
    for code, name in drawn["countries"]:
        if code not in countries:
            countries[code] = Country.objects.using(alias).create(code=code, name=name)
    parents = list(countries.values())
    languages: dict[tuple[int, str], Language] = {}
    for i, code, name in drawn["languages"]:
        if parents and (i % len(parents), code) not in languages:
            country = parents[i % len(parents)]
            languages[i % len(parents), code] = Language.objects.using(alias).create(
                country=country, code=code, name=name
            )
    keys: set[tuple[int, str]] = set()
    langs = list(languages.values())
    for i, key, value in drawn["copies"]:
        if langs and (i % len(langs), key) not in keys:
            keys.add((i % len(langs), key))
            Copy.objects.using(alias).create(language=langs[i % len(langs)], key=key, value=value)


def check(alias: str, model: type[models.Model], lookups: dict[str, Any]) -> tuple[int, int]:
    """Assert the property for one filter on the rows there; (rows it selects, rows)."""
    options = registry.get_options(model)
    assert options is not None
    label = options.label
    selection = Selection.of(Target(name="regional", row_filters={label: lookups}))
    pks = list(model._base_manager.using(alias).filter(**lookups).values_list("pk", flat=True))
    payloads = payloads_from_db(options, pks, alias)
    rows = {canonical_row(p["key"], p["data"]) for p in payloads.values()}
    # Pages of 2, so that the keyset by primary key runs through the filter.
    served: list[str] = []
    after = None
    while True:
        page = snapshot.page(label, after, 2, alias, selection=selection)
        served += [canonical_row(r["key"], r["data"]) for r in page["rows"]]
        after = page["next"]
        if not page["more"]:
            break
    assert sorted(served) == sorted(rows), lookups
    assert snapshot.start(alias, selection)["counts"][label] == len(rows)
    theirs = DigestPage(7)
    after = None
    while True:
        body = snapshot.digest(label, after, 3, 7, alias, selection)
        theirs.merge(body["digests"])
        after = body["next"]
        if not body["more"]:
            break
    mine = DigestPage(7)
    mine.add(
        [canonical_key(p["key"]) for p in payloads.values()],
        [canonical_row(p["key"], p["data"]) for p in payloads.values()],
    )
    assert theirs.differing(mine) == [] and sum(theirs.counts) == len(rows), lookups
    return len(rows), model._base_manager.using(alias).count()


def test_a_filtered_snapshot_is_what_the_orm_selects(db_alias: str) -> None:
    selected: list[tuple[int, int]] = []

    @settings(
        max_examples=150,
        derandomize=True,  # the same examples on every run
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
        ],
    )
    @given(ROWS, a_filter())
    def filtered_snapshot(drawn: dict[str, Any], chosen: tuple[type[models.Model], Any]) -> None:
        model, lookups = chosen
        assume(not filter_problems({model._meta.label_lower: lookups}))
        with transaction.atomic(using=db_alias):
            create(db_alias, drawn)
            selected.append(check(db_alias, model, lookups))
            transaction.set_rollback(True, using=db_alias)

    filtered_snapshot()
    # Not only empty or whole selections: the property met rows it keeps and drops.
    assert sum(1 for kept, total in selected if 0 < kept < total) >= 12, selected
