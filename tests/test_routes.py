"""Issue 14: capture routes each event of a filtered model to each filtered Target
(``source/routes.py``): ``u`` in its filter before and after, ``j`` joined, ``l``
left, ``d`` deleted while in it, ``-`` nothing for it.

On SQLite, PostgreSQL and MariaDB, through every way capture sees a write (save,
delete, many-to-many, bulk_create with and without conflicts, bulk_update,
QuerySet.update), and a Hypothesis property: for any sequence of such writes,
replaying each Target's routes yields exactly the rows ``Model.objects.filter``
selects for its filter at the end (the ORM alone gives the expectation).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changefeed_sync.models import Event, Target
from changefeed_sync.source import routes
from tests.testapp.models import Copy, Country, Language, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SECRET = ["test-secret-not-real"]


@pytest.fixture(autouse=True)
def fresh_routing() -> Any:
    routes.forget()
    yield
    routes.forget()


def _target(alias: str, name: str, row_filters: dict[str, Any], **extra: Any) -> str:
    """A saved Target; its route id."""
    target = Target.objects.using(alias).create(
        name=name, secrets=SECRET, row_filters=row_filters, **extra
    )
    return routes.route_id(target)


def _routes(alias: str, since_id: int = 0) -> list[tuple[str, str, list[Any], dict[str, str]]]:
    """(model, op, key, route id -> op) of the events after ``since_id``."""
    found = []
    for e in Event.objects.using(alias).filter(id__gt=since_id).order_by("id"):
        found.append((e.model, e.op, e.key, routes.parse(e.routes) if e.routes else {}))
    return found


def _last_id(alias: str) -> int:
    return Event.objects.using(alias).order_by("-id").values_list("id", flat=True).first() or 0


def test_no_filtered_target_no_routes_and_no_extra_statement(db_alias: str) -> None:
    Target.objects.using(db_alias).create(name="everything", secrets=SECRET)
    fr = Country.objects.using(db_alias).create(code="fr", name="France")  # reads the Targets
    connection = connections[db_alias]
    with CaptureQueriesContext(connection) as with_targets:
        fr.name = "République"
        fr.save(using=db_alias)
    assert [e.routes for e in Event.objects.using(db_alias).all()] == [None, None]
    Target.objects.using(db_alias).all().delete()
    fr.save(using=db_alias)  # reads the (no) Targets again
    with CaptureQueriesContext(connection) as without_targets:
        fr.name = "France"
        fr.save(using=db_alias)
    assert len(with_targets) == len(without_targets)


def test_saves_and_deletes_route_by_the_rows_own_fields(db_alias: str) -> None:
    regional = _target(db_alias, "regional", {"testapp.country": {"code__in": ["fr", "be"]}})
    german = _target(db_alias, "german", {"testapp.country": {"code": "de"}})
    # Reads no country: not concerned with them, no entry.
    _target(
        db_alias, "copies", {"testapp.copy": {"value__startswith": "pub"}},
        model_labels=["testapp.copy"],
    )  # fmt: skip
    fr = Country.objects.using(db_alias).create(code="fr", name="France")
    fr.name = "République"
    fr.save(using=db_alias)
    fr.code = "de"  # leaves regional, joins german
    fr.save(using=db_alias)
    it = Country.objects.using(db_alias).create(code="it")  # in neither
    it.name = "Italia"
    it.save(using=db_alias)
    it.delete()
    fr.delete()
    got = [(op, key, r) for _, op, key, r in _routes(db_alias)]
    assert got == [
        ("upsert", ["fr"], {regional: "j", german: "-"}),
        ("upsert", ["fr"], {regional: "u", german: "-"}),
        ("upsert", ["de"], {regional: "l", german: "j"}),
        ("upsert", ["it"], {regional: "-", german: "-"}),
        ("upsert", ["it"], {regional: "-", german: "-"}),
        ("delete", ["it"], {regional: "-", german: "-"}),
        ("delete", ["de"], {regional: "-", german: "d"}),
    ]


def test_a_target_saved_in_a_row_filtered_to_nothing_or_with_bad_filters(db_alias: str) -> None:
    """A Target whose saved filters are invalid (E011) is routed nothing: an entry "-"
    in every event of every model, rather than events its filters were to hold back."""
    broken = Target.objects.using(db_alias).create(name="broken", secrets=SECRET)
    Target.objects.using(db_alias).filter(pk=broken.pk).update(
        row_filters={"testapp.country": {"nope": 1}}
    )
    broken.refresh_from_db(using=db_alias)
    rid = routes.route_id(broken)
    fr = Country.objects.using(db_alias).create(code="fr")
    Language.objects.using(db_alias).create(country=fr, code="fr")
    assert [(m, r) for m, _, _, r in _routes(db_alias)] == [
        ("testapp.country", {rid: "-"}),
        ("testapp.language", {rid: "-"}),
    ]


def test_many_to_many_and_querysets_route_too(db_alias: str) -> None:
    pub = _target(db_alias, "pub", {"testapp.copy": {"value__startswith": "pub"}})
    fr = Country.objects.using(db_alias).create(code="fr")
    lang = Language.objects.using(db_alias).create(country=fr, code="fr")
    a = Copy.objects.using(db_alias).create(language=lang, key="a", value="pub a")
    b = Copy.objects.using(db_alias).create(language=lang, key="b", value="draft b")
    tag = Tag.objects.using(db_alias).create(slug="t")
    mark = _last_id(db_alias)
    a.tags.add(tag)  # rows unchanged: u for the member, - for the other
    b.tags.add(tag)
    Copy.objects.using(db_alias).filter(pk=a.pk).update(value="draft a")  # leaves
    b.value = "pub b"
    Copy.objects.using(db_alias).bulk_update([b], ["value"])  # joins
    Copy.objects.using(db_alias).bulk_create(
        [Copy(language=lang, key="c", value="pub c"), Copy(language=lang, key="d", value="x")]
    )
    copies = [(op, key[-1], r.get(pub)) for m, op, key, r in _routes(db_alias, mark)
              if m == "testapp.copy"]  # fmt: skip
    assert copies == [
        ("upsert", "a", "u"),
        ("upsert", "b", "-"),
        ("upsert", "a", "l"),
        ("upsert", "b", "j"),
        ("upsert", "c", "j"),
        ("upsert", "d", "-"),
    ]


def test_bulk_create_over_existing_rows_routes_from_what_they_were(db_alias: str) -> None:
    if not connections[db_alias].features.supports_update_conflicts_with_target and (
        connections[db_alias].vendor != "mysql"
    ):
        pytest.skip("no update_conflicts on this database")  # every database of the suite has it
    rid = _target(db_alias, "regional", {"testapp.country": {"name__startswith": "in"}})
    Country.objects.using(db_alias).create(code="fr", name="in")
    Country.objects.using(db_alias).create(code="de", name="out")
    mark = _last_id(db_alias)
    kwargs: dict[str, Any] = {"update_conflicts": True, "update_fields": ["name"]}
    if connections[db_alias].vendor != "mysql":
        kwargs["unique_fields"] = ["code"]
    Country.objects.using(db_alias).bulk_create(
        [Country(code="fr", name="out"), Country(code="de", name="in"),
         Country(code="be", name="in")], **kwargs,
    )  # fmt: skip
    got = sorted((key[0], r[rid]) for _, _, key, r in _routes(db_alias, mark))
    assert got == [("be", "j"), ("de", "j"), ("fr", "l")]


def test_changed_filters_get_a_new_route_id(db_alias: str) -> None:
    target = Target.objects.using(db_alias).create(
        name="regional", secrets=SECRET, row_filters={"testapp.country": {"code": "fr"}}
    )
    first = routes.route_id(target)
    Country.objects.using(db_alias).create(code="fr")
    target.row_filters = {"testapp.country": {"code": "be"}}
    target.save(using=db_alias)  # forgets the cached Targets in this process
    second = routes.route_id(target)
    assert second != first
    Country.objects.using(db_alias).create(code="be")
    assert [r for _, _, _, r in _routes(db_alias)] == [{first: "j"}, {second: "j"}]


# ---------------------------------------------------------------- the property

CODES = ["fr", "be", "de", "it"]
NAMES = ["in", "in b", "out", "In", ""]
FILTERS = st.sampled_from(
    [
        {"code__in": ["fr", "be"]},
        {"code": "de"},
        {"name__startswith": "in"},
        {"name__in": ["in", "out"], "code__in": ["fr", "de", "it"]},
        {"name__gt": "in"},
    ]
)
WRITE = st.one_of(
    st.tuples(st.just("save"), st.sampled_from(CODES), st.sampled_from(NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(CODES), st.sampled_from(CODES)),
    st.tuples(st.just("delete"), st.sampled_from(CODES), st.just("")),
    st.tuples(st.just("update"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("bulk_update"), st.sampled_from(CODES), st.sampled_from(NAMES)),
)


def _write(alias: str, action: tuple[str, str, str]) -> None:
    kind, a, b = action
    rows = Country.objects.using(alias)
    if kind == "save":
        found = rows.filter(code=a).first() or Country(code=a)
        found.name = b
        found.save(using=alias)
    elif kind == "rename":
        found = rows.filter(code=a).first()
        if found is not None and not rows.filter(code=b).exists():
            found.code = b
            found.save(using=alias)
    elif kind == "delete":
        rows.filter(code=a).delete()
    elif kind == "update":
        rows.filter(name=a).update(name=b)
    else:
        found = rows.filter(code=a).first()
        if found is not None:
            found.name = b
            rows.bulk_update([found], ["name"])


def _replay(alias: str, rid: str) -> set[tuple[Any, ...]]:
    """The countries a Target would hold after applying its routes in order."""
    held: set[tuple[Any, ...]] = set()
    for e in Event.objects.using(alias).filter(model="testapp.country").order_by("id"):
        op = routes.parse(e.routes or "").get(rid)
        assert op is not None, f"event {e.id} has no route for {rid}: {e.routes!r}"
        if op in ("u", "j"):
            if e.old_key is not None:
                held.discard(tuple(e.old_key))
            held.add(tuple(e.key))
        elif op in ("l", "d"):
            held.discard(tuple(e.key))
            if e.old_key is not None:
                held.discard(tuple(e.old_key))
        else:
            assert op == "-", op
            assert tuple(e.key) not in held, "a row the Target holds routed as nothing"
    return held


def test_replaying_routes_gives_the_filtered_rows_for_any_writes(db_alias: str) -> None:
    @settings(
        max_examples=40,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(FILTERS, min_size=1, max_size=3), st.lists(WRITE, min_size=1, max_size=12))
    def replay(filters: list[dict[str, Any]], writes: list[tuple[str, str, str]]) -> None:
        Event.objects.using(db_alias).all().delete()
        Country.objects.using(db_alias).all().delete()
        Target.objects.using(db_alias).all().delete()
        routes.forget()
        Event.objects.using(db_alias).all().delete()  # the deletes above were events too
        ids = [
            _target(db_alias, f"t{i}", {"testapp.country": lookups})
            for i, lookups in enumerate(filters)
        ]
        for action in writes:
            with transaction.atomic(using=db_alias):
                _write(db_alias, action)
        for rid, lookups in zip(ids, filters, strict=True):
            expected = {
                (code,)
                for code in Country.objects.using(db_alias)
                .filter(**lookups)
                .values_list("code", flat=True)
            }
            assert _replay(db_alias, rid) == expected, (lookups, writes)

    replay()


@pytest.mark.parametrize("db_alias", ["postgres", "mariadb"], indirect=True)
def test_which_targets_had_the_row_is_read_under_its_lock(db_alias: str) -> None:
    """Another transaction moves the row into the filter and has not committed when
    this one, which moves it out again, reads where it was: that read must wait for
    the other's commit (the row's lock), or this event says "nothing" to a Target
    the other's event gave the row to, and the Target keeps it."""
    import threading

    from tests.test_concurrency import Worker, wait_for

    rid = _target(db_alias, "regional", {"testapp.country": {"name": "in"}})
    fr = Country.objects.using(db_alias).create(code="fr", name="out")
    mine = Country.objects.using(db_alias).get(pk=fr.pk)  # loaded before the other's change
    moved, release = threading.Event(), threading.Event()

    def other() -> None:
        with transaction.atomic(using=db_alias):
            row = Country.objects.using(db_alias).get(pk=fr.pk)
            row.name = "in"
            row.save(using=db_alias)
            moved.set()
            release.wait(30)

    worker = Worker("other", other)
    worker.start()
    wait_for(moved, worker, "move the row in")
    timer = threading.Timer(0.5, release.set)  # commits while this save waits for the lock
    timer.start()
    try:
        mine.name = "out b"
        mine.save(using=db_alias)
    finally:
        release.set()
        timer.cancel()
        worker.finish()
    assert [r[rid] for _, _, _, r in _routes(db_alias)] == ["-", "j", "l"]
    assert _replay(db_alias, rid) == set()


# ---------------------------------------------------------------- through a parent

HOP_FILTERS = st.sampled_from(
    [
        # Closed: a row's parents are inside whenever it is (the rest would be rows
        # outside the filters, which a target cannot hold).
        {
            "testapp.language": {"country__code__in": ["fr", "be"]},
            "testapp.copy": {"language__country__code__in": ["fr", "be"]},
        },
        {"testapp.copy": {"language__country__code__in": ["fr", "be"]}},
        {"testapp.copy": {"language__country__name__startswith": "in", "value": "pub"}},
        {
            "testapp.language": {"country__name": "in"},
            "testapp.copy": {"language__country__name": "in", "language__code": "l1"},
        },
    ]
)
HOP_WRITE = st.one_of(
    st.tuples(st.just("country code"), st.sampled_from(CODES), st.sampled_from(CODES)),
    st.tuples(st.just("country name"), st.sampled_from(CODES), st.sampled_from(NAMES)),
    st.tuples(st.just("countries update"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("language country"), st.sampled_from(["l1", "l2"]), st.sampled_from(CODES)),
    st.tuples(
        st.just("language code"), st.sampled_from(["l1", "l2"]), st.sampled_from(["l1", "l2"])
    ),
    st.tuples(st.just("copy value"), st.sampled_from(["a", "b"]), st.sampled_from(["pub", "x"])),
    st.tuples(st.just("delete country"), st.sampled_from(CODES), st.just("")),
)


def _hop_world(alias: str) -> None:
    for code, name in (("fr", "in"), ("de", "out"), ("be", "in b")):
        country = Country.objects.using(alias).create(code=code, name=name)
        for lang in ("l1", "l2"):
            language = Language.objects.using(alias).create(country=country, code=lang)
            for key in ("a", "b"):
                Copy.objects.using(alias).create(language=language, key=key, value="pub")


def _hop_write(alias: str, action: tuple[str, str, str]) -> None:
    kind, a, b = action
    countries = Country.objects.using(alias)
    if kind == "country code":
        found = countries.filter(code=a).first()
        if found is not None and not countries.filter(code=b).exists():
            found.code = b
            found.save(using=alias)
    elif kind == "country name":
        found = countries.filter(code=a).first()
        if found is not None:
            found.name = b
            found.save(using=alias)
    elif kind == "countries update":
        countries.filter(name=a).update(name=b)
    elif kind == "language country":
        # The first language of that code whose move breaks no unique pair.
        country = countries.filter(code=b).first()
        for language in Language.objects.using(alias).filter(code=a).order_by("pk"):
            clash = Language.objects.using(alias).filter(country=country, code=a).exists()
            if country is not None and not clash:
                language.country = country
                language.save(using=alias)
                break
    elif kind == "language code":
        for language in Language.objects.using(alias).filter(code=a).order_by("pk"):
            if (
                not Language.objects.using(alias)
                .filter(country=language.country_id, code=b)
                .exists()
            ):
                Language.objects.using(alias).filter(pk=language.pk).update(code=b)
                break
    elif kind == "copy value":
        Copy.objects.using(alias).filter(key=a).update(value=b)
    else:
        countries.filter(code=a).delete()


def _replay_all(
    alias: str, rid: str, since_id: int, start: dict[str, set[tuple[Any, ...]]]
) -> dict[str, set[tuple[Any, ...]]]:
    """Per model, the keys a Target holds after applying in order every event it gets:
    routed ones as their routes say, those of models its filters do not read as they are
    (route-only events excluded). Parents' renames carry their children's keys along, as
    foreign keys do on the target."""
    held = {label: set(keys) for label, keys in start.items()}
    for e in Event.objects.using(alias).filter(id__gt=since_id).order_by("id"):
        rows = held.setdefault(e.model, set())
        parsed = routes.parse(e.routes) if e.routes else None
        if parsed is None or rid not in parsed:
            if e.routes and e.routes.startswith("*"):
                continue  # route-only, for other Targets
            op = "u" if e.op == "upsert" else "d"
        else:
            op = parsed[rid]
        if e.old_key is not None and tuple(e.old_key) in rows and op in ("u", "j"):
            _rename(held, e.model, tuple(e.old_key), tuple(e.key))
        if op in ("u", "j"):
            rows.add(tuple(e.key))
        elif op in ("l", "d"):
            rows.discard(tuple(e.key))
            if e.old_key is not None:
                rows.discard(tuple(e.old_key))
            _cascade_delete(held, e.model, tuple(e.key if e.old_key is None else e.old_key))
    return held


def _rename(
    held: dict[str, set[tuple[Any, ...]]], model: str, old: tuple[Any, ...], new: tuple[Any, ...]
) -> None:
    held[model].discard(old)
    prefix = len(old)
    if model not in ("testapp.country", "testapp.language"):
        return
    for child in ("testapp.language", "testapp.copy"):
        if child == model:
            continue
        rows = held.get(child, set())
        for key in list(rows):
            if key[:prefix] == old and len(key) > prefix:
                rows.discard(key)
                rows.add(new + key[prefix:])


def _cascade_delete(
    held: dict[str, set[tuple[Any, ...]]], model: str, key: tuple[Any, ...]
) -> None:
    """A parent deleted on the target takes its children (on_delete=CASCADE)."""
    for child in ("testapp.language", "testapp.copy"):
        if child == model or model not in ("testapp.country", "testapp.language"):
            continue
        rows = held.get(child, set())
        for k in list(rows):
            if k[: len(key)] == key and len(k) > len(key):
                rows.discard(k)


def _expected_keys(
    alias: str, lookups: dict[str, dict[str, Any]]
) -> dict[str, set[tuple[Any, ...]]]:
    from changefeed_sync import registry
    from changefeed_sync.serialization import payloads_from_db

    out = {}
    for model in (Country, Language, Copy):
        options = registry.get_options(model)
        assert options is not None
        rows = model._base_manager.using(alias).filter(**lookups.get(options.label, {}))
        payloads = payloads_from_db(options, list(rows.values_list("pk", flat=True)), alias)
        out[options.label] = {tuple(p["key"]) for p in payloads.values()}
    return out


def test_a_parents_change_moves_its_children_for_any_writes(db_alias: str) -> None:
    @settings(
        max_examples=30,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(HOP_FILTERS, st.lists(HOP_WRITE, min_size=1, max_size=8))
    def moved(filters: dict[str, Any], writes: list[tuple[str, str, str]]) -> None:
        for model in (Copy, Language, Country, Target):
            model.objects.using(db_alias).all().delete()
        routes.forget()
        _hop_world(db_alias)
        # The target starts as a Data Pull would leave it: the filtered rows now.
        start = _expected_keys(db_alias, filters)
        mark = _last_id(db_alias)
        rid = _target(db_alias, "regional", filters)
        for action in writes:
            with transaction.atomic(using=db_alias):
                _hop_write(db_alias, action)
        held = _replay_all(db_alias, rid, mark, start)
        got = {label: held.get(label, set()) for label in start}
        assert got == _expected_keys(db_alias, filters), (filters, writes)

    moved()


def test_a_stale_instance_writing_an_old_value_back_is_routed_by_what_is_stored(
    db_alias: str,
) -> None:
    """A save that changes no field the filters read is routed where the row already
    is: "changes" means against the stored row, since an instance loaded before
    another writer's change writes its old values back."""
    rid = _target(db_alias, "regional", {"testapp.country": {"name": "in"}})
    fr = Country.objects.using(db_alias).create(code="fr", name="out")
    stale = Country.objects.using(db_alias).get(pk=fr.pk)
    Country.objects.using(db_alias).filter(pk=fr.pk).update(name="in")  # comes in
    stale.save(using=db_alias)  # writes "out" back: leaves
    fresh = Country.objects.using(db_alias).get(pk=fr.pk)
    fresh.code = "fx"  # a field no filter reads: stays out
    fresh.save(using=db_alias)
    assert [r[rid] for _, _, _, r in _routes(db_alias)] == ["-", "j", "l", "-"]
    assert _replay(db_alias, rid) == set()


def test_a_stale_parent_writing_an_old_value_back_moves_its_children_back(db_alias: str) -> None:
    """A parent's save moves children when it changes, against the stored row, a field
    a filter reads: a country loaded before its name changed writes the old name back."""
    filters = {"testapp.copy": {"language__country__name": "in"}}
    _hop_world(db_alias)
    start = _expected_keys(db_alias, filters)
    mark = _last_id(db_alias)
    rid = _target(db_alias, "regional", filters)
    stale = Country.objects.using(db_alias).get(code="fr")  # name "in"
    Country.objects.using(db_alias).filter(code="fr").update(name="out")  # its copies leave
    stale.save(using=db_alias)  # writes "in" back: they come in again
    held = _replay_all(db_alias, rid, mark, start)
    assert {label: held.get(label, set()) for label in start} == _expected_keys(db_alias, filters)
    assert len(held["testapp.copy"]) == 4
