"""Capture: every write of a registered model becomes one outbox event, in its transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import DatabaseError, connections, transaction
from django.db.models import F, Value
from django.db.models.functions import Concat

from changefeed_sync import applying
from changefeed_sync.models import Event
from tests.helpers import events
from tests.testapp.models import Category, Copy, Country, Language, Plain, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def _world(alias: str) -> tuple[Country, Language, Copy]:
    fr = Country.objects.using(alias).create(code="fr", name="France")
    lang = Language.objects.using(alias).create(country=fr, code="fr", name="French")
    copy = Copy.objects.using(alias).create(language=lang, key="hello", value="Bonjour")
    return fr, lang, copy


def test_create_update_delete_write_one_event_each(db_alias: str) -> None:
    fr, lang, copy = _world(db_alias)
    copy.value = "Salut"
    copy.save(using=db_alias)
    copy.delete()
    got = [(e.model, e.op, e.key) for e in events(db_alias)]
    assert got == [
        ("testapp.country", "upsert", ["fr"]),
        ("testapp.language", "upsert", ["fr", "fr"]),
        ("testapp.copy", "upsert", ["fr", "fr", "hello"]),
        ("testapp.copy", "upsert", ["fr", "fr", "hello"]),
        ("testapp.copy", "delete", ["fr", "fr", "hello"]),
    ]
    create, update = events(db_alias)[2:4]
    assert create.data == {"language": ["fr", "fr"], "key": "hello", "value": "Bonjour", "tags": []}
    assert "default" not in create.data  # not in fields=
    assert update.data["value"] == "Salut"
    assert update.changed == ["value"]
    assert update.old_key is None


def test_unregistered_model_writes_nothing(db_alias: str) -> None:
    Plain.objects.using(db_alias).create(code="xx")
    assert events(db_alias) == []


def test_rename_carries_old_key(db_alias: str) -> None:
    fr, lang, copy = _world(db_alias)
    fr.code = "fx"
    fr.save(using=db_alias)
    last = events(db_alias)[-1]
    assert (last.key, last.old_key, last.changed) == (["fx"], ["fr"], ["code"])
    copy.key = "hi"
    copy.save(using=db_alias)
    last = events(db_alias)[-1]
    assert (last.key, last.old_key) == (["fx", "fr", "hi"], ["fx", "fr", "hello"])


def test_event_rolls_back_with_the_change(db_alias: str) -> None:
    with pytest.raises(RuntimeError):
        with transaction.atomic(using=db_alias):
            Country.objects.using(db_alias).create(code="de")
            raise RuntimeError("boom")
    assert events(db_alias) == []
    assert not Country.objects.using(db_alias).exists()


def test_a_rolled_back_savepoint_drops_its_events_only(db_alias: str) -> None:
    """Savepoints inside one transaction: the events of saves in a rolled-back
    savepoint go with it, those before, after and in released savepoints stay
    (MariaDB keeps them until the commit, several saves' events together)."""
    with transaction.atomic(using=db_alias):
        Country.objects.using(db_alias).create(code="a1")
        Country.objects.using(db_alias).create(code="a2")
        with pytest.raises(RuntimeError), transaction.atomic(using=db_alias):
            Country.objects.using(db_alias).create(code="b1")
            raise RuntimeError("inner block fails")
        Country.objects.using(db_alias).create(code="c1")
        with transaction.atomic(using=db_alias):
            Country.objects.using(db_alias).create(code="d1")
            with pytest.raises(RuntimeError), transaction.atomic(using=db_alias):
                Country.objects.using(db_alias).create(code="e1")
                raise RuntimeError("innermost block fails")
            Country.objects.using(db_alias).create(code="d2")
        Country.objects.using(db_alias).create(code="f1")
    assert [e.key for e in events(db_alias)] == [["a1"], ["a2"], ["c1"], ["d1"], ["d2"], ["f1"]]
    stored = Country.objects.using(db_alias).order_by("code").values_list("code", flat=True)
    assert list(stored) == ["a1", "a2", "c1", "d1", "d2", "f1"]


_REFUSE = "crash between row and outbox write"


@contextmanager
def _events_refused(alias: str) -> Iterator[None]:
    """A real fault: while active, the database itself refuses every outbox row."""
    connection = connections[alias]
    table = Event._meta.db_table
    create = {
        "sqlite": [
            f"CREATE TRIGGER cfs_refuse BEFORE INSERT ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END"
        ],
        "postgresql": [
            "CREATE FUNCTION cfs_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_REFUSE}'; END $$",
            f"CREATE TRIGGER cfs_refuse BEFORE INSERT ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION cfs_refuse()",
        ],
        "mysql": [
            f"CREATE TRIGGER cfs_refuse BEFORE INSERT ON {table} FOR EACH ROW "
            f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{_REFUSE}'"
        ],
    }[connection.vendor]
    drop = {
        "sqlite": ["DROP TRIGGER cfs_refuse"],
        "postgresql": [f"DROP TRIGGER cfs_refuse ON {table}", "DROP FUNCTION cfs_refuse()"],
        "mysql": ["DROP TRIGGER cfs_refuse"],
    }[connection.vendor]
    with connection.cursor() as cursor:
        for sql in create:
            cursor.execute(sql)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            for sql in drop:
                cursor.execute(sql)


def test_a_failed_capture_inside_atomic_dooms_the_transaction(
    db_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the caller's transaction, a save whose event could not be made must
    not commit without it, even when the caller catches the error and goes on.
    The fault is injected (building the event raises): the real faults behind it
    (a natural key that cannot be read, a bug) have no reliable trigger."""
    from changefeed_sync.source import capture, capture_pg

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("event could not be built")

    monkeypatch.setattr(capture, "upsert_change", broken)
    monkeypatch.setattr(capture_pg, "upsert_change", broken)
    with transaction.atomic(using=db_alias):
        with pytest.raises(RuntimeError, match="could not be built"):
            Country(code="pt", name="Portugal").save(using=db_alias)
        assert connections[db_alias].needs_rollback
    assert not Country.objects.using(db_alias).filter(code="pt").exists()
    assert events(db_alias) == []


def test_autocommit_save_and_event_are_one_transaction(db_alias: str) -> None:
    """A failure between the row write and the outbox write must undo the row too.

    The fault is the database refusing the event row (a trigger), after it
    accepted the row: creates and updates, in autocommit as in a web request."""
    assert connections[db_alias].get_autocommit()
    italy = Country.objects.using(db_alias).create(code="it", name="Italy")
    with _events_refused(db_alias):
        with pytest.raises(DatabaseError, match=_REFUSE):
            Country.objects.using(db_alias).create(code="es")
        italy.name = "Italia"
        with pytest.raises(DatabaseError, match=_REFUSE):
            italy.save(using=db_alias)
    assert not Country.objects.using(db_alias).filter(code="es").exists()
    assert Country.objects.using(db_alias).get(code="it").name == "Italy"
    assert [e.key for e in events(db_alias)] == [["it"]]
    # Without the fault the same saves go through, row and event.
    Country.objects.using(db_alias).create(code="es")
    italy.save(using=db_alias)
    assert [(e.key, e.data["name"]) for e in events(db_alias)[1:]] == [
        (["es"], ""),
        (["it"], "Italia"),
    ]


def test_bulk_operations_are_captured(db_alias: str) -> None:
    countries = Country.objects.using(db_alias).bulk_create(
        [Country(code=c, name=c.upper()) for c in ("aa", "bb", "cc")]
    )
    assert [e.key for e in events(db_alias)] == [["aa"], ["bb"], ["cc"]]
    for c in countries:
        c.name = "renamed"
    Country.objects.using(db_alias).bulk_update(countries, ["name"])
    new = events(db_alias)[3:]
    assert [(e.key, e.data["name"], e.changed) for e in new] == [
        (["aa"], "renamed", ["name"]), (["bb"], "renamed", ["name"]), (["cc"], "renamed", ["name"])
    ]
    n = Country.objects.using(db_alias).filter(code__in=["aa", "bb"]).update(name="upd")
    assert n == 2
    new = events(db_alias)[6:]
    assert sorted((e.key[0], e.data["name"]) for e in new) == [("aa", "upd"), ("bb", "upd")]
    Country.objects.using(db_alias).filter(code="cc").update(code="cz")
    last = events(db_alias)[-1]
    assert (last.key, last.old_key) == (["cz"], ["cc"])
    deleted = Country.objects.using(db_alias).filter(code__in=["aa", "bb"]).delete()
    assert deleted[0] == 2
    assert sorted((e.op, e.key) for e in events(db_alias)[-2:]) == [
        ("delete", ["aa"]), ("delete", ["bb"])
    ]


def test_bulk_create_ignore_conflicts_is_captured(db_alias: str) -> None:
    Country.objects.using(db_alias).create(code="aa", name="old")
    Country.objects.using(db_alias).bulk_create(
        [Country(code="aa", name="x"), Country(code="bb", name="y")], ignore_conflicts=True
    )
    got = sorted((e.key[0], e.data["name"]) for e in events(db_alias)[1:])
    assert got == [("aa", "old"), ("bb", "y")]  # the state as stored, conflict left alone


def test_cascade_delete_captures_children(db_alias: str) -> None:
    fr, lang, copy = _world(db_alias)
    fr.delete()
    tail = [(e.model, e.op, e.key) for e in events(db_alias)[3:]]
    assert ("testapp.copy", "delete", ["fr", "fr", "hello"]) in tail
    assert ("testapp.language", "delete", ["fr", "fr"]) in tail
    assert tail[-1] == ("testapp.country", "delete", ["fr"])


def test_m2m_changes_are_captured_both_directions(db_alias: str) -> None:
    fr, lang, copy = _world(db_alias)
    red = Tag.objects.using(db_alias).create(slug="red")
    blue = Tag.objects.using(db_alias).create(slug="blue")
    copy.tags.add(red, blue)
    assert events(db_alias)[-1].data["tags"] == [["blue"], ["red"]]
    red.copies.remove(copy)
    assert events(db_alias)[-1].data["tags"] == [["blue"]]
    blue.copies.clear()
    last = events(db_alias)[-1]
    assert (last.model, last.key, last.data["tags"]) == ("testapp.copy", ["fr", "fr", "hello"], [])


def test_applying_suppresses_capture(db_alias: str) -> None:
    with applying():
        Country.objects.using(db_alias).create(code="nz")
        Country.objects.using(db_alias).filter(code="nz").update(name="x")
    assert events(db_alias) == []


def test_update_fields_reads_the_stored_row(db_alias: str) -> None:
    Category.objects.using(db_alias).create(slug="root")
    stale = Category.objects.using(db_alias).get(slug="root")
    Category.objects.using(db_alias).filter(slug="root").update(slug="top")
    other = Category.objects.using(db_alias).create(slug="kid")
    other.parent = stale
    other.save(update_fields=["parent"])
    assert events(db_alias)[-1].data == {"slug": "kid", "parent": ["top"]}


def test_a_field_saved_as_an_expression_carries_the_stored_value(db_alias: str) -> None:
    """``obj.name = Concat(F("name"), ...)``: the instance holds the expression,
    only the database knows the result; the event must carry the result."""
    country = Country.objects.using(db_alias).create(code="aa", name="x")
    country.name = Concat(F("name"), Value("y"))
    country.save(using=db_alias)
    assert events(db_alias)[-1].data == {"code": "aa", "name": "xy"}
