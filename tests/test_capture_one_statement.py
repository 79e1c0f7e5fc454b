"""PostgreSQL: a save sends its row and its event as one statement.

``capture_pg`` rewrites the row's INSERT / UPDATE into a data-modifying WITH that
also inserts the event (``outbox_pg``), in autocommit and inside ``atomic()``.
These tests pin what that must keep: one statement, the same event the
two-statement path writes, all or nothing (tests/test_capture.py refuses the
event row with a trigger), no wait for other writers, and every other kind of
save left on the two-statement path.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, transaction
from django.db.models import F, Value, signals
from django.db.models.functions import Concat, Upper

import changefeed_sync
from changefeed_sync import registry
from changefeed_sync.models import Event
from changefeed_sync.serialization import payloads_from_db
from changefeed_sync.source import capture, capture_pg, outbox_pg
from tests.helpers import events
from tests.testapp.models import Country, Kinds, Language, Plain

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.parametrize("db_alias", ["postgres"], indirect=True),
    pytest.mark.timeout(60),
]


def _statements(alias: str, action: Any) -> list[str]:
    """The statements ``action`` handed to the database driver, less push's read of
    the targets (at most once a second). Recorded below Django's execute wrappers
    (whose query log shows, depending on the Django version, the SQL as compiled)."""
    connection = connections[alias]
    connection.ensure_connection()
    cursor_class = connection.connection.cursor_factory
    original = cursor_class.execute
    sent: list[str] = []

    def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        sent.append(str(query))
        return original(self, query, params, **kwargs)

    cursor_class.execute = execute
    try:
        action()
    finally:
        cursor_class.execute = original
    return [q for q in sent if "changefeed_sync_target" not in q]


def _sent_per_save(sent: list[str]) -> list[str]:
    """First words of what a save sent, less a first use's PREPARE."""
    return [q.split()[0] for q in sent if not q.startswith("PREPARE ")]


def _separate_events(sent: list[str]) -> int:
    """Events inserted by a statement of their own (the two-statement path)."""
    return sum(q.startswith('INSERT INTO "changefeed_sync_event"') for q in sent)


def _saves(alias: str, code: str) -> None:
    """Create, edit, rename: each a save of a registered model."""
    country = Country(code=code, name="created")
    country.save(using=alias)
    country.name = "edited"
    country.save(using=alias)
    loaded = Country.objects.using(alias).get(code=code)
    loaded.code = code.upper()
    loaded.save(using=alias)


def _content(event: Event, code: str) -> tuple[Any, ...]:
    """An event with its own code replaced, to compare two runs of ``_saves``."""

    def plain(value: Any) -> str:
        return repr(value).replace(repr(code), "'C'").replace(repr(code.upper()), "'U'")

    return (event.model, event.op, plain(event.key), plain(event.old_key), plain(event.data),
            event.changed)  # fmt: skip


def _prepared(alias: str) -> dict[str, str]:
    """Statements prepared on ``alias``'s current session: name -> text."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT name, statement FROM pg_prepared_statements")
        return dict(cursor.fetchall())


@pytest.fixture(autouse=True)
def _fresh_preparing() -> Iterator[None]:
    """Each test starts with preparing on (a test may switch it off for its alias)."""
    outbox_pg._not_preparing.clear()
    yield
    outbox_pg._not_preparing.clear()


def test_an_autocommit_save_is_one_statement(db_alias: str) -> None:
    country = Country(code="aa", name="created")
    sent = _statements(db_alias, lambda: country.save(using=db_alias))
    assert _sent_per_save(sent) == ["EXECUTE"], sent
    assert country.pk == Country.objects.using(db_alias).get(code="aa").pk  # RETURNING read back
    # Sent as EXECUTE of the WITH statement, prepared on this session.
    name = sent[-1].removeprefix("EXECUTE ").partition("(")[0]
    text = _prepared(db_alias)[name]
    assert text.startswith("PREPARE cfs_") and " AS WITH " in text, text
    assert '"_cfs_event" AS (INSERT INTO "changefeed_sync_event"' in text, text
    # The next save of the same shape only executes it.
    sent = _statements(db_alias, lambda: Country(code="ab").save(using=db_alias))
    assert sent == [f"EXECUTE {name}({', '.join(['%s'] * 4)})"], sent  # the row's 2, the event's 2
    country.name = "edited"
    sent = _statements(db_alias, lambda: country.save(using=db_alias))
    assert _sent_per_save(sent) == ["EXECUTE"], sent
    assert [(e.key, e.data, e.changed) for e in events(db_alias)] == [
        (["aa"], {"code": "aa", "name": "created"}, ["code", "name"]),
        (["ab"], {"code": "ab", "name": ""}, ["code", "name"]),
        (["aa"], {"code": "aa", "name": "edited"}, ["name"]),
    ]
    # An UPDATE that finds no row (deleted meanwhile) writes no event; Django then inserts.
    Country.objects.using(db_alias).filter(pk=country.pk).delete()
    country.name = "again"
    sent = _statements(db_alias, lambda: country.save(using=db_alias))
    assert _sent_per_save(sent) == ["EXECUTE", "EXECUTE"], sent
    tail = [(e.op, e.key, e.data) for e in events(db_alias)[3:]]
    assert tail == [("delete", ["aa"], None), ("upsert", ["aa"], {"code": "aa", "name": "again"})]


def test_a_save_inside_atomic_is_one_statement_too(db_alias: str) -> None:
    """Inside ``atomic()`` the row and its event are one statement as well (a
    statement more per save was twice the cost of an unregistered save), and
    the event becomes visible with the transaction."""
    Country(code="zz").save(using=db_alias)  # prepared on this session
    with transaction.atomic(using=db_alias):
        sent = _statements(db_alias, lambda: _saves(db_alias, "ab"))
        assert _separate_events(sent) == 0, sent
        assert sum(q.startswith("EXECUTE ") for q in sent) == 3, sent
    assert [e.key for e in events(db_alias)[1:]] == [["ab"], ["ab"], ["AB"]]
    assert events(db_alias)[-1].old_key == ["ab"]
    # Rolled back with the transaction: row and event.
    with pytest.raises(RuntimeError), transaction.atomic(using=db_alias):
        Country(code="rb").save(using=db_alias)
        raise RuntimeError("roll back")
    assert not Event.objects.using(db_alias).filter(key=["rb"]).exists()
    assert not Country.objects.using(db_alias).filter(code="rb").exists()


def test_one_statement_events_equal_the_two_statement_path(
    db_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same saves, once as one statement each and once with the rewrite
    switched off (row, then event): the events must be the same."""
    _saves(db_alias, "ab")
    fast = events(db_alias)

    def two_statements() -> None:
        with monkeypatch.context() as m:
            m.setattr(capture, "one_statement_plan", lambda *args: None)
            _saves(db_alias, "cd")

    sent = _statements(db_alias, two_statements)
    assert _separate_events(sent) == 3  # the two-statement path ran
    slow = events(db_alias)[len(fast) :]
    assert len(fast) == len(slow) == 3
    assert [_content(e, "ab") for e in fast] == [_content(e, "cd") for e in slow]
    assert (fast[-1].key, fast[-1].old_key) == (["AB"], ["ab"])


def test_other_saves_keep_the_transaction(db_alias: str) -> None:
    """Where the event needs more than the instance, the save is a transaction
    with the event as its own statement, as on the other databases."""
    fr = Country.objects.using(db_alias).create(code="fr", name="France")

    def lock_statements(action: Any) -> int:
        return _separate_events(_statements(db_alias, action))

    # A foreign key in the key and payload: the related row's key is read.
    assert lock_statements(lambda: Language(country=fr, code="fr").save(using=db_alias)) == 1
    # Only some fields saved: the stored row is read.
    assert lock_statements(lambda: fr.save(using=db_alias, update_fields=["name"])) == 1
    # An expression: only the database knows the value it stores.
    fr.name = Concat(F("name"), Value("!"))
    assert lock_statements(lambda: fr.save(using=db_alias)) == 1
    assert events(db_alias)[-1].data["name"] == "France!"
    # A row never loaded: what it held before is read first.
    stranger = Country(pk=fr.pk, code="fr", name="Stranger")
    stranger._state.adding = False
    assert lock_statements(lambda: stranger.save(using=db_alias)) == 1
    assert events(db_alias)[-1].changed == ["name"]
    # Inside a transaction a plain save is one statement too.
    with transaction.atomic(using=db_alias):
        fr = Country.objects.using(db_alias).get(code="fr")
        fr.name = "Inside"
        assert lock_statements(lambda: fr.save(using=db_alias)) == 0


def test_a_statement_of_an_unknown_shape_falls_back_to_a_transaction(
    db_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Django compiles saves into shapes ``outbox_pg`` knows; should a future
    version send another, the save must still write row and event together.
    Faked here by making the rewrite decline every statement (no database
    produces an unknown shape today)."""
    monkeypatch.setattr(outbox_pg, "row_statement", lambda sql: None)
    outbox_pg._statements.clear()
    try:
        country = Country(code="ee", name="created")
        sent = _statements(db_alias, lambda: country.save(using=db_alias))
        # In a transaction: the row, the event.
        assert [q.split()[:3] for q in sent] == [
            ["INSERT", "INTO", '"testapp_country"'],
            ["INSERT", "INTO", '"changefeed_sync_event"'],
        ], sent
        country.name = "edited"
        country.save(using=db_alias)
    finally:
        outbox_pg._statements.clear()
    assert [(e.key, e.data["name"]) for e in events(db_alias)] == [
        (["ee"], "created"),
        (["ee"], "edited"),
    ]


@pytest.mark.parametrize(
    ("sql", "returns"),
    [
        ('INSERT INTO "t" ("a", "b") VALUES (%s, %s) RETURNING "t"."id"', True),
        ('INSERT INTO "t" ("id", "a") VALUES (%s, %s)', False),
        ('UPDATE "t" SET "a" = %s, "b" = %s WHERE "t"."id" = %s', False),
        ('UPDATE "t" SET "a" = %s WHERE "t"."id" = %s RETURNING "t"."g"', True),
        ('INSERT INTO "t" ("a") VALUES (%s), (%s) RETURNING "t"."id"', None),  # two rows
        ('INSERT INTO "t" ("a", "b") VALUES (%s::integer[], %s::numeric(5, 2)[])', False),
        ('UPDATE "t" SET "a" = NULL, "b" = %s WHERE "t"."id" = %s', False),
        ('INSERT INTO "t" ("a", "b") VALUES (%s, DEFAULT) RETURNING "t"."id"', None),
        # A value the database computes (an expression a field's pre_save returned).
        ('INSERT INTO "t" ("a", "b") VALUES (%s, UPPER(%s)) RETURNING "t"."id", "t"."b"', None),
        ('UPDATE "t" SET "a" = UPPER(%s) WHERE "t"."id" = %s RETURNING "t"."a"', None),
        ('UPDATE "t" SET "a" = %s WHERE "t"."id" = %s AND "t"."v" = %s', None),
        ('UPDATE "t" SET "a" = %s WHERE "t"."id" IN (SELECT 1 WHERE true)', None),
        ('DELETE FROM "t" WHERE "t"."id" = %s', None),
    ],
)
def test_which_statements_are_rewritten(db_alias: str, sql: str, returns: Any) -> None:
    assert outbox_pg.row_statement(sql) == (None if returns is None else (sql, returns))


def test_an_autocommit_save_does_not_wait_for_an_open_transaction(db_alias: str) -> None:
    """A transaction wrote events and stays open; a save in autocommit of another
    row commits at once (no lock among writers), and its event comes first in the
    feed. A save of a row the transaction changed waits for that row only."""
    from changefeed_sync.source import feed

    alias = db_alias
    row = Country.objects.using(alias).create(code="aa", name="start")
    cursor = feed.head(alias)
    done = threading.Event()
    errors: list[BaseException] = []

    def autocommit_save() -> None:
        try:
            Country(code="cc", name="autocommit").save(using=alias)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()
            connections.close_all()

    worker = threading.Thread(target=autocommit_save, daemon=True)
    with transaction.atomic(using=alias):
        Country.objects.using(alias).create(code="bb")
        row.name = "transaction"
        row.save(using=alias)
        worker.start()
        assert done.wait(10), "the autocommit save waited for the open transaction"
        assert not errors, errors
        # Read on a connection of its own (this one sees its own uncommitted events).
        seen: list[Any] = []
        reader = threading.Thread(
            target=lambda: (
                seen.extend(e["key"] for e in feed.read(cursor, 10, using=alias).events),
                connections.close_all(),
            ),
            daemon=True,
        )
        reader.start()
        reader.join(30)
        assert seen == [["cc"]]
    worker.join(30)
    tail = [(e["key"], e["data"]["name"]) for e in feed.read(cursor, 10, using=alias).events]
    assert tail == [(["cc"], "autocommit"), (["bb"], ""), (["aa"], "transaction")]


def test_a_prepared_statement_that_went_missing_is_sent_unprepared(
    db_alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pooler's reset (DISCARD ALL) or another server session leaves the name
    unknown: the save still goes through, once, unprepared, and preparing stops
    for that database with a warning."""
    country = Country.objects.using(db_alias).create(code="aa", name="created")
    country.name = "edited"
    country.save(using=db_alias)  # the UPDATE's statement is prepared too now
    assert len([n for n in _prepared(db_alias) if n.startswith("cfs_")]) == 2
    with connections[db_alias].cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    country.name = "after reset"
    with caplog.at_level("WARNING", logger="changefeed_sync.capture"):
        sent = _statements(db_alias, lambda: country.save(using=db_alias))
    assert [q.split()[0] for q in sent] == ["EXECUTE", "WITH"], sent  # refused, then unprepared
    assert "went missing" in caplog.text and "DISABLE_SERVER_SIDE_CURSORS" in caplog.text
    sent = _statements(db_alias, lambda: Country(code="bb").save(using=db_alias))
    assert [q.split()[0] for q in sent] == ["WITH"], sent
    assert _prepared(db_alias) == {}
    assert [(e.key, e.data["name"]) for e in events(db_alias)] == [
        (["aa"], "created"),
        (["aa"], "edited"),
        (["aa"], "after reset"),
        (["bb"], ""),
    ]


@pytest.mark.parametrize("setting", [False, True, None], ids=["unprepared", "prepared", "default"])
def test_every_field_type_reaches_the_event_as_stored(
    db_alias: str, setting: bool | None, settings: Any
) -> None:
    """Values bound into the one statement (prepared or not) are stored as the
    ORM stores them, and the event carries what the stored row serializes to."""
    settings.CHANGEFEED_SYNC_PREPARE_STATEMENTS = setting
    # UTC: an event from memory writes the offset the value has, one read back UTC's.
    tz = datetime.timezone.utc
    values = dict(
        big=2**62 + 1,
        dec=decimal.Decimal("123456.123456"),
        when=datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=tz),
        day=datetime.date(1999, 12, 31),
        uid=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        blob=b"\x00\xffbinary",
        doc={"a": [1, 2, {"b": None}], "c": "é", "q": "it's 100%"},
        flag=True,
        ratio=0.1,
        span=datetime.timedelta(days=2, microseconds=7),
        color="blue",
    )
    full = Kinds(slug="all", **values)
    empty = Kinds(slug="empty")
    for obj in (full, empty):
        sent = _statements(db_alias, lambda obj=obj: obj.save(using=db_alias))
        assert _sent_per_save(sent) == (["WITH"] if setting is False else ["EXECUTE"]), sent
    full.doc = ["changed", None]
    full.span = datetime.timedelta(seconds=-1)
    sent = _statements(db_alias, lambda: full.save(using=db_alias))
    assert _sent_per_save(sent) == (["WITH"] if setting is False else ["EXECUTE"]), sent
    options = registry.get_options(Kinds)
    assert options is not None
    stored = payloads_from_db(options, [full.pk, empty.pk], db_alias)
    got = events(db_alias)
    assert [e.data for e in got] == [
        {**stored[full.pk]["data"], "doc": values["doc"], "span": "P2DT00H00M00.000007S"},
        stored[empty.pk]["data"],
        stored[full.pk]["data"],
    ]
    assert got[-1].changed == ["doc", "span"]
    assert Kinds.objects.using(db_alias).get(slug="all").blob == values["blob"]
    kinds_prepared = [t for t in _prepared(db_alias).values() if '"testapp_kinds"' in t]
    assert len(kinds_prepared) == (0 if setting is False else 2)  # INSERT, UPDATE


def test_a_receiver_that_saves_the_instance_again(db_alias: str) -> None:
    """A post_save receiver saving the same instance: two saves, two events, each
    sent as its own statement, and the outer save's state survives the inner one."""

    def again(sender: Any, instance: Country, created: bool, **kwargs: Any) -> None:
        if instance.name == "first":
            instance.name = "second"
            instance.save(using=db_alias)

    signals.post_save.connect(again, sender=Country, dispatch_uid="test-again")
    try:
        country = Country(code="aa", name="first")
        sent = _statements(db_alias, lambda: country.save(using=db_alias))
        with transaction.atomic(using=db_alias):
            Country(code="bb", name="first").save(using=db_alias)
    finally:
        signals.post_save.disconnect(sender=Country, dispatch_uid="test-again")
    assert _sent_per_save(sent) == ["EXECUTE", "EXECUTE"], sent
    assert [(e.key, e.data["name"], e.changed) for e in events(db_alias)] == [
        (["aa"], "first", ["code", "name"]),
        (["aa"], "second", ["name"]),
        (["bb"], "first", ["code", "name"]),
        (["bb"], "second", ["name"]),
    ]
    assert "_changefeed_one_statement" not in country.__dict__


def test_a_statement_postgresql_will_not_prepare_is_sent_unprepared(
    db_alias: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every statement Django compiles for a save prepares; should one not, the
    save still goes through unprepared. The refusal is PostgreSQL's own, to a
    PREPARE made invalid here (a type that does not exist)."""
    real = outbox_pg._statement

    def broken(connection: Any, sql: str, model: Any) -> Any:
        statement = real(connection, sql, model)
        return dataclasses.replace(
            statement,
            name=statement.name + "_x",
            prepare=statement.prepare.replace(" AS WITH ", " AS SELECT $1::no_such_type; WITH "),
        )

    monkeypatch.setattr(outbox_pg, "_statement", broken)
    outbox_pg._statements.clear()
    try:
        with caplog.at_level("WARNING", logger="changefeed_sync.capture"):
            sent = _statements(db_alias, lambda: Country(code="aa").save(using=db_alias))
            again = _statements(db_alias, lambda: Country(code="ab").save(using=db_alias))
    finally:
        outbox_pg._statements.clear()
        outbox_pg._unpreparable.clear()
    assert [q.split()[0] for q in sent] == ["PREPARE", "WITH"], sent
    assert [q.split()[0] for q in again] == ["WITH"], again  # not tried twice
    assert "could not prepare" in caplog.text
    assert [e.key for e in events(db_alias)] == [["aa"], ["ab"]]


def test_an_expression_set_by_a_pre_save_receiver(db_alias: str) -> None:
    """The plan is made before pre_save; a receiver may still set an expression
    there. Only the database knows the stored value: the save becomes a
    transaction again and the event carries what was stored (an INSERT's id,
    which Django reads back only afterwards, comes from lastval())."""

    def shout(sender: Any, instance: Country, **kwargs: Any) -> None:
        instance.name = Concat(Value("<"), Value(instance.code), Value(">"))

    signals.pre_save.connect(shout, sender=Country, dispatch_uid="test-shout")
    try:
        country = Country(code="aa")
        created = _statements(db_alias, lambda: country.save(using=db_alias))
        country = Country.objects.using(db_alias).get(code="aa")
        country.code = "ab"
        updated = _statements(db_alias, lambda: country.save(using=db_alias))
    finally:
        signals.pre_save.disconnect(sender=Country, dispatch_uid="test-shout")
    for sent in (created, updated):
        assert _separate_events(sent) == 1 and not any(q.startswith("EXECUTE") for q in sent), sent
    assert [(e.key, e.old_key, e.data) for e in events(db_alias)] == [
        (["aa"], None, {"code": "aa", "name": "<aa>"}),
        (["ab"], ["aa"], {"code": "ab", "name": "<ab>"}),
    ]


def test_a_statement_a_field_sends_while_compiling_the_row_is_left_alone(
    db_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field's pre_save runs while Django compiles the row's INSERT, and may
    write to the same database itself (a storage keeping files in a table). Only
    the row's own statement may carry the event. Faked with a pre_save that
    writes a Plain row (no field of the test app writes to the database).

    Django 6.0+ calls pre_save once more for an INSERT, before compiling it (to
    find values to read back with RETURNING), with or without this app: each
    call writes a row of its own here, as a write that is not idempotent would,
    and the last call is the one made while compiling."""
    connection = connections[db_alias]
    field = Country._meta.get_field("name")
    original = field.pre_save
    compiling: list[bool] = []  # per call: whether the row's statement was being sent

    def pre_save(instance: Any, add: bool) -> Any:
        if add:
            compiling.append(
                any(isinstance(w, capture_pg._Rewriter) for w in connection.execute_wrappers)
            )
            Plain.objects.using(db_alias).create(code=f"{instance.code[0]}{len(compiling)}")
        return original(instance, add)

    monkeypatch.setattr(field, "pre_save", pre_save)
    sent = _statements(db_alias, lambda: Country(code="aa").save(using=db_alias))
    assert compiling and compiling[-1] and not any(compiling[:-1]), compiling
    plain = [q for q in sent if q.startswith('INSERT INTO "testapp_plain" ')]
    rest = [q.split()[0] for q in sent if q not in plain and not q.startswith("PREPARE")]
    assert len(plain) == len(compiling) and rest == ["EXECUTE"], sent
    codes = [f"a{n}" for n in range(1, len(compiling) + 1)]
    assert Plain.objects.using(db_alias).filter(code__in=codes).count() == len(codes)
    assert [(e.model, e.key) for e in events(db_alias)] == [("testapp.country", ["aa"])]


def test_an_expression_returned_by_a_field_pre_save(
    db_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field's pre_save may return an expression without setting it on the
    instance: Django compiles it into the statement and only the database knows
    the stored value (Django 6.0+ reads it back with RETURNING after the
    statement, older versions never). The event must carry what was stored,
    on every version: the save becomes a transaction and reads the row."""
    field = Country._meta.get_field("name")

    def pre_save(instance: Any, add: bool) -> Any:
        return Upper(Value(f"{instance.code}-{'new' if add else 'old'}"))

    monkeypatch.setattr(field, "pre_save", pre_save)
    country = Country(code="aa", name="in memory")
    created = _statements(db_alias, lambda: country.save(using=db_alias))
    country.name = "edited in memory"
    updated = _statements(db_alias, lambda: country.save(using=db_alias))
    for sent in (created, updated):
        assert _separate_events(sent) == 1 and not any(q.startswith("EXECUTE") for q in sent), sent
    stored = Country.objects.using(db_alias).get(code="aa")
    assert stored.name == "AA-OLD"
    assert [(e.key, e.data) for e in events(db_alias)] == [
        (["aa"], {"code": "aa", "name": "AA-NEW"}),
        (["aa"], {"code": "aa", "name": "AA-OLD"}),
    ]


def test_a_natural_key_the_database_assigns(db_alias: str) -> None:
    """natural_key=["id"] on an auto-increment id: the key is known only after the
    INSERT, so such a model keeps the transaction path and its event names the id."""
    changefeed_sync.register(Plain, natural_key=["id"])
    try:
        options = registry.get_options(Plain)
        assert options is not None and not options.payload_in_memory
        row = Plain(code="aa")
        sent = _statements(db_alias, lambda: row.save(using=db_alias))
    finally:
        changefeed_sync.unregister(Plain)
    assert _separate_events(sent) == 1, sent
    assert [(e.model, e.key) for e in events(db_alias)] == [("testapp.plain", [row.pk])]


def test_a_prepared_name_covers_the_column_types(
    db_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parameter types are fixed when a statement is prepared: after a migration
    changes a column's type the statement must get another name, or a session
    that still has the old one (a pooled one) would run it with the old types."""
    connection = connections[db_alias]
    sql = 'INSERT INTO "testapp_country" ("code", "name") VALUES (%s, %s) RETURNING "id"'
    before = outbox_pg._statement(connection, sql, Country)
    field = Country._meta.get_field("name")
    monkeypatch.setattr(field, "db_type", lambda connection: "text")
    after = outbox_pg._statement(connection, sql, Country)
    assert before is not None and after is not None
    assert before.text == after.text and before.name != after.name
