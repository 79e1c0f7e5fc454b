"""Issue 14: a filtered Data Pull makes the target equal to the filtered source, whatever
either holds and whatever changed on the source since the last pull.

A Hypothesis property, the filtered variant of tests/test_pull_convergence.py's: random
countries, languages and copies on both sides (rows inside and outside the Target's
filters, the same natural keys with other values); a filtered pull; then random changes
on the source through the ORM (creates, updates moving rows into and out of the filters
through their own field and through a parent's, renames of natural keys, moves to
another parent, deletes); a filtered re-pull, compared by full pages or by bucket
digests, with pages of 1, 3 or 1,000 rows. After each pull the target must hold exactly
the rows ``Model.objects.filter(**lookups)`` selects on the source. Real HTTP to a live
server of this process, each database as source and as target once (the ``sides`` of
tests/test_row_filters_pull.py: its Target's filters, a row's own field and a parent's
two hops up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import requests
from django.db import IntegrityError, transaction
from django.test import override_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from changefeed_sync import applying
from changefeed_sync.target.client import SourceClient
from changefeed_sync.target.pull import digests, run_pull
from tests.helpers import state
from tests.test_row_filters_pull import IN, Sides, expected, sides  # noqa: F401 (fixture)
from tests.testapp.models import Copy, Country, Language

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(300),
]

# Two countries inside the filters (IN) and two outside; values inside ("pub...") and
# outside; lower case only, so that MariaDB's case-insensitive collation sees no clash
# that the other databases do not.
CODES = [*IN, "de", "nl"]
LANGUAGES = ["l1", "l2", "l3"]
KEYS = ["k1", "k2", "k3"]
VALUES = ["pub", "pub x", "draft", ""]


@dataclass
class Rows:
    """Countries (code, name), languages (country code, code) and copies (country
    code, language code, key, value), each list unique by natural key."""

    countries: list[tuple[str, str]]
    languages: list[tuple[str, str]]
    copies: list[tuple[str, str, str, str]]


@st.composite
def rows(draw: st.DrawFn) -> Rows:
    codes = draw(st.lists(st.sampled_from(CODES), unique=True, max_size=len(CODES)))
    countries = [(code, draw(st.sampled_from(["x", "y"]))) for code in codes]
    languages = [
        (code, lang)
        for code in codes
        for lang in draw(st.lists(st.sampled_from(LANGUAGES), unique=True, max_size=2))
    ]
    copies = [
        (code, lang, key, draw(st.sampled_from(VALUES)))
        for code, lang in languages
        for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=2))
    ]
    return Rows(countries, languages, copies)


#: Published French copies that no change picks (a language of its own), in the
#: ``digests`` examples: with a row a bucket, a re-pull then finds few buckets differ and
#: fetches the rows of those only (more than a quarter differing, every row is pulled).
FILLER = 30
FILLER_LANGUAGE = "ff"


def build(alias: str, content: Rows, filler: int = 0) -> None:
    """Exactly ``content`` on ``alias``, and ``filler`` copies in France, written without
    events (a state, not changes)."""
    with transaction.atomic(using=alias), applying():
        Copy.objects.using(alias).all().delete()
        Language.objects.using(alias).all().delete()
        Country.objects.using(alias).all().delete()
        countries = {
            code: Country.objects.using(alias).create(code=code, name=name)
            for code, name in content.countries
        }
        languages = {
            (code, lang): Language.objects.using(alias).create(country=countries[code], code=lang)
            for code, lang in content.languages
        }
        Copy.objects.using(alias).bulk_create(
            Copy(language=languages[code, lang], key=key, value=value)
            for code, lang, key, value in content.copies
        )
        if filler:
            france = countries.get("fr") or Country.objects.using(alias).create(code="fr")
            language = Language.objects.using(alias).create(country=france, code=FILLER_LANGUAGE)
            Copy.objects.using(alias).bulk_create(
                Copy(language=language, key=f"f{i:02}", value="pub") for i in range(filler)
            )


#: A change: its kind, which row (an index into the rows of the model, by primary key),
#: which other row (a new parent), and a value (a code, a key or a copy's value).
Change = tuple[str, int, int, str]
KINDS = [
    "create country", "rename country", "rename country",  # codes in and out of IN
    "create language", "move language", "rename language",
    "create copy", "set value", "set value", "rename copy", "move copy",
    "delete country", "delete language", "delete copy",
]  # fmt: skip
CHANGES = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 20),
        st.integers(0, 20),
        st.sampled_from(CODES + LANGUAGES + KEYS + VALUES),
    ),
    min_size=1,
    max_size=8,
)


def pick(queryset: Any, i: int) -> Any:
    found = list(queryset.order_by("pk"))
    return found[i % len(found)] if found else None


def change(alias: str, kind: str, i: int, j: int, value: str) -> None:
    """One change through the ORM (captured, as a site's own writes are); a change that
    would break a unique constraint or names a row that is not there does nothing."""
    countries = Country.objects.using(alias)
    languages = Language.objects.using(alias).exclude(code=FILLER_LANGUAGE)
    copies = Copy.objects.using(alias).exclude(language__code=FILLER_LANGUAGE)
    verb, _, noun = kind.partition(" ")
    noun = "copy" if noun == "value" else noun
    row = None if verb == "create" else pick({"country": countries, "language": languages,
                                              "copy": copies}[noun], i)  # fmt: skip
    parent = pick(countries if noun == "language" else languages, j)
    if (
        row is None
        and verb != "create"
        or parent is None
        and kind in ("create language", "create copy", "move language", "move copy")
    ):
        return
    try:
        with transaction.atomic(using=alias):
            if kind == "create country":
                countries.create(code=value[:2] or "zz", name="new")
            elif kind == "create language":
                languages.create(country=parent, code=value[:2] or "zz")
            elif kind == "create copy":
                copies.create(language=parent, key=value, value=VALUES[i % len(VALUES)])
            elif verb == "delete":
                row.delete()
            else:
                attribute = {
                    "rename country": "code", "rename language": "code", "rename copy": "key",
                    "set value": "value", "move language": "country", "move copy": "language",
                }[kind]  # fmt: skip
                new = (
                    parent
                    if verb == "move"
                    else (value[:2] or "zz")
                    if attribute == "code"
                    else value
                )
                setattr(row, attribute, new)
                row.save()
    except IntegrityError:
        pass


#: More requests than any pull of these few rows makes, pages of one row included.
MAX_REQUESTS = 1000


def pull(s: Sides) -> None:
    """A filtered Data Pull that fails when it asks the source more than MAX_REQUESTS
    times: a pull that never ends must fail the property, not hang the run."""
    asked: list[str] = []

    def count(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        asked.append(response.request.path_url)
        if len(asked) > MAX_REQUESTS:
            raise AssertionError(f"a pull of {MAX_REQUESTS} requests and more: {asked[-3:]}")

    session = requests.Session()
    session.hooks["response"].append(count)
    run_pull(s.ds, using=s.tgt, client=SourceClient(s.ds, session), allow_mass_delete=True)


@hsettings(
    max_examples=8,
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    source=rows(),
    target=rows(),
    changes=CHANGES,
    page=st.sampled_from([1, 3, 1000]),
)
@pytest.mark.parametrize("compare", ["rows", "digests"])
def test_a_filtered_pull_makes_the_target_equal_the_filtered_source(
    sides: Sides,  # noqa: F811 (the fixture)
    source: Rows,
    target: Rows,
    changes: list[Change],
    page: int,
    compare: str,
) -> None:
    s = sides
    filler = FILLER if compare == "digests" else 0
    build(s.src, source, filler)
    build(s.tgt, target, filler)
    per_bucket = 10**9 if compare == "rows" else 1
    with (
        override_settings(CHANGEFEED_SYNC_PULL_PAGE_SIZE=page),
        mock.patch.object(digests, "ROWS_PER_BUCKET", per_bucket),
    ):
        pull(s)
        assert state(s.tgt) == expected(s.src)
        for one in changes:
            change(s.src, *one)
        pull(s)
    assert state(s.tgt) == expected(s.src)
