"""End to end: a source site served by ``runserver``, a target site pulling it over HTTP.

Every site is its own set of processes with its own database (tests/servers.py); the
target runs the real ``manage.py changefeed_sync`` command against the source's real
server on 127.0.0.1. Nothing is mocked. Per backend pair the sites are set up once
(module-scoped fixture) and the tests below run in file order against them: the first
one starts from an empty target.
"""

from __future__ import annotations

import importlib
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from changefeed_sync.signing import sign_request
from tests.dbs import require_alias
from tests.servers import ALIAS_OF, Background, Site, free_port, wait_until

pytestmark = pytest.mark.timeout(120)

#: (source backend, target backend): each backend is a source once and a target once.
PAIRS = [
    ("sqlite", "sqlite"),
    ("sqlite", "postgres"),
    ("postgres", "mariadb"),
    ("mariadb", "sqlite"),
]
#: For the slower tests: these pairs still have every backend on both sides.
COVERING_PAIRS = [("sqlite", "sqlite"), ("postgres", "mariadb"), ("mariadb", "sqlite")]

SECRET = "e2e-secret"


def over(pairs: list[tuple[str, str]]) -> pytest.MarkDecorator:
    """Run a test once per (source, target) backend pair; the pair's sites are shared."""
    return pytest.mark.parametrize(
        "pair", pairs, indirect=True, ids=[f"{s}-{t}" for s, t in pairs]
    )


SEED_SOURCE = f"""
import datetime, decimal, uuid
from changefeed_sync.models import Target
from tests.testapp.models import Category, Copy, Country, Kinds, Language, Tag

Target.objects.create(name="tgt", secrets={SECRET!r})
tags = {{slug: Tag.objects.create(slug=slug) for slug in ["t-a", "t-b", "t-c", "t-d"]}}
for code, name in [("fr", "France"), ("de", "Deutschland"), ("it", "Italia"), ("es", "España")]:
    Country.objects.create(code=code, name=name)
langs = [
    Language.objects.create(country=Country.objects.get(code=c), code=l, name=n)
    for c, l, n in [("fr", "fr", "Français"), ("de", "de", "Deutsch"), ("it", "it", "Italiano"),
                    ("es", "es", "Español"), ("es", "ca", "Català")]
]
for lang in langs:
    for key in ["hello", "bye", "emoji"]:
        copy = Copy.objects.create(
            language=lang, key=key, value=f"{{key}} in {{lang.name}} 👋", default="local only"
        )
        copy.tags.set([tags["t-a"], tags["t-b"] if key == "hello" else tags["t-c"]])
# Captured through bulk_create: enough rows for several feed pages.
Copy.objects.bulk_create(
    [Copy(language=langs[0], key=f"bulk-{{i:02d}}", value=f"v{{i}}") for i in range(20)]
)
root = Category.objects.create(slug="root")
child = Category.objects.create(slug="child", parent=root)
Category.objects.create(slug="grandchild", parent=child)
Kinds.objects.create(
    slug="all", big=2**60 + 1, dec=decimal.Decimal("1234.567891"),
    when=datetime.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=datetime.timezone.utc),
    day=datetime.date(1999, 12, 31), uid=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    blob=b"\\x00\\xffbin", doc={{"a": [1, 2.5, {{"b": None}}], "ü": "x"}}, flag=True,
    ratio=0.1, span=datetime.timedelta(days=1, microseconds=5), color="blue",
)
"""

EDIT_SOURCE = """
import datetime
from django.db import transaction
from tests.testapp.models import Category, Copy, Country, Kinds, Language, Tag

fr = Country.objects.get(code="fr")
fr.code, fr.name = "fx", "France (renamed)"  # renames the country and its rows' keys
fr.save()
hello = Copy.objects.get(language__country__code="de", key="hello")
hello.value = "Hallo!"
hello.save()
hello.tags.add(Tag.objects.get(slug="t-d"))
hello.tags.remove(Tag.objects.get(slug="t-a"))
Tag.objects.get(slug="t-c").copies.clear()  # reverse side of the many-to-many
Country.objects.get(code="it").delete()  # cascades to its language and copies
Copy.objects.get(language__code="ca", key="bye").delete()
spanish = list(Copy.objects.filter(language__country__code="es"))
for copy in spanish:
    copy.value += " (bulk)"
Copy.objects.bulk_update(spanish, ["value"])
Copy.objects.filter(language__country__code="fx", key__startswith="bulk-1").update(value="upd")
Language.objects.filter(code="ca").update(code="cx")  # a rename through QuerySet.update
Tag.objects.bulk_create([Tag(slug="t-new1"), Tag(slug="t-new2")])
with transaction.atomic():
    grandchild = Category.objects.get(slug="grandchild")
    grandchild.parent = Category.objects.get(slug="root")
    grandchild.save()
    Category.objects.get(slug="child").delete()
Kinds.objects.filter(slug="all").update(
    span=datetime.timedelta(seconds=-1), doc=[None, True, "ü"], blob=b"", big=-(2**62)
)
"""

DUMP_STATE = """
from tests.helpers import state
print(json.dumps({
    label: {json.dumps(list(key)): data for key, data in rows.items()}
    for label, rows in state("default").items()
}))
"""

DATA_SOURCE = """
from changefeed_sync.models import DataSource
DataSource.objects.create(name={name!r}, url={url!r}, client_name="tgt", secrets={secret!r})
"""

SYNC_LINE = re.compile(r"src: applied (\d+) events in (\d+) pages, checkpoint (\d+)")


@dataclass
class Pair:
    source: Site
    target: Site

    @property
    def label(self) -> str:
        return f"{self.source.backend}->{self.target.backend}"


def _parallel(*calls: Any) -> list[Any]:
    """Run independent subprocess-bound calls at once (two sites, two processes)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    source_backend, target_backend = request.param
    require_alias(ALIAS_OF[source_backend])
    require_alias(ALIAS_OF[target_backend])
    workdir = tmp_path_factory.mktemp(f"e2e-{source_backend}-{target_backend}")
    source = Site("src", source_backend, workdir)
    target = Site("tgt", target_backend, workdir)
    source.port = free_port()  # known now, so the target's Data Source can name it
    try:
        for site in (source, target):
            site.start_shell()  # starts up while the databases are created and migrated
            site.create_database()

        def prepare_source() -> None:
            source.migrate()
            source.start_server()
            source.run_python(SEED_SOURCE)

        def prepare_target() -> None:
            target.migrate()
            target.run_python(
                DATA_SOURCE.format(name="src", url=f"{source.url}sync/", secret=SECRET)
            )

        _parallel(prepare_source, prepare_target)
        yield Pair(source, target)
    finally:
        for site in (source, target):
            site.close()


# ---------------------------------------------------------------------- helpers


def sync(target: Site, *args: str) -> tuple[int, int, int]:
    """``manage.py changefeed_sync src ARGS`` on the target: (events, pages, checkpoint)."""
    result = target.run_django("changefeed_sync", "src", *args)
    match = SYNC_LINE.search(result.stdout)
    assert match, f"no summary line in:\n{result.stdout}\n{result.stderr}"
    events, pages, checkpoint = (int(g) for g in match.groups())
    return events, pages, checkpoint


def last_event_id(source: Site) -> int:
    return int(source.scalar("SELECT MAX(id) FROM changefeed_sync_event") or 0)


def last_nonce_id(source: Site) -> int:
    """Grows by one with every signed request the source accepts."""
    return int(source.scalar("SELECT MAX(id) FROM changefeed_sync_nonce") or 0)


def checkpoint(target: Site, name: str = "src") -> int:
    return int(target.scalar(
        "SELECT checkpoint FROM changefeed_sync_datasource WHERE name = %s", [name]
    ))


def states(pair: Pair) -> tuple[dict[str, Any], dict[str, Any]]:
    src, tgt = _parallel(
        lambda: pair.source.run_python(DUMP_STATE), lambda: pair.target.run_python(DUMP_STATE)
    )
    return src, tgt


def assert_same_state(pair: Pair) -> dict[str, Any]:
    src, tgt = states(pair)
    for label in sorted(set(src) | set(tgt)):
        s, t = src.get(label, {}), tgt.get(label, {})
        assert sorted(s) == sorted(t), f"{pair.label}: {label} rows differ by natural key"
        for key in s:
            assert s[key] == t[key], f"{pair.label}: {label} {key} differs"
    return src


def pk_of(site: Site, table: str, column: str, value: str) -> int | None:
    return site.scalar(f"SELECT id FROM {table} WHERE {column} = %s", [value])


def count_copies_with_default(site: Site) -> int:
    column = "`default`" if site.backend == "mariadb" else '"default"'
    return int(site.scalar(f"SELECT COUNT(*) FROM testapp_copy WHERE {column} <> ''"))


def country_name(site: Site, code: str) -> str | None:
    return site.scalar("SELECT name FROM testapp_country WHERE code = %s", [code])


def set_country(source: Site, code: str, name: str) -> None:
    """Create or rename a Country on the source, through the ORM (so it is captured)."""
    source.run_python(
        "from tests.testapp.models import Country\n"
        f"Country.objects.update_or_create(code={code!r}, defaults={{'name': {name!r}}})"
    )


def wait_until_long_polling(source: Site, follower: Background) -> None:
    """Wait until the follower asked the source for events after the last one.

    The feed view records the cursor of every request (Target.last_seen_seq) before it
    starts waiting, so from then on the follower sits in a long-poll.

    Tests write on the source only while the follower long-polls: a feed request writes
    (its nonce, Target.last_seen_*), and on SQLite a write transaction that began with a
    read fails at once with "database is locked" when another connection is committing
    (SQLite's deadlock avoidance; Django >= 5.1 can avoid it with the OPTIONS
    ``"transaction_mode": "IMMEDIATE"``).
    """

    def polling() -> bool:
        assert follower.poll() is None, follower.output()
        seen = source.scalar(
            "SELECT last_seen_seq FROM changefeed_sync_target WHERE name = %s", ["tgt"]
        )
        return seen is not None and int(seen) == last_event_id(source)

    wait_until(polling, timeout=15, what="the follower to catch up and long-poll")


# ---------------------------------------------------------------------- sync


@over(PAIRS)
def test_sync_applies_everything_then_edits(pair: Pair) -> None:
    source, target = pair.source, pair.target
    seeded = last_event_id(source)
    assert seeded > 60  # the seed wrote enough to need several pages of 7

    events, pages, cp = sync(target, "--limit", "7")
    assert (events, cp) == (seeded, seeded)
    assert pages == -(-seeded // 7)
    assert checkpoint(target) == seeded
    state = assert_same_state(pair)
    assert sorted(state["testapp.country"]) == ['["de"]', '["es"]', '["fr"]', '["it"]']
    assert len(state["testapp.copy"]) == 5 * 3 + 20
    kinds = state["testapp.kinds"]['["all"]']
    assert kinds["big"] == str(2**60 + 1) and kinds["dec"] == "1234.567891"
    assert kinds["doc"] == {"a": [1, 2.5, {"b": None}], "ü": "x"}
    # Copy.default is not in fields=: set on the source, it must not travel.
    assert count_copies_with_default(source) == 15
    assert count_copies_with_default(target) == 0
    # Applying does not capture: the target's own outbox stays empty.
    assert last_event_id(target) == 0

    fr_pk = pk_of(target, "testapp_country", "code", "fr")
    ca_pk = pk_of(target, "testapp_language", "code", "ca")
    assert fr_pk is not None and ca_pk is not None
    source.run_python(EDIT_SOURCE)
    edited = last_event_id(source)
    assert edited > seeded

    events, pages, cp = sync(target)
    assert (events, cp) == (edited - seeded, edited)
    state = assert_same_state(pair)
    assert sorted(state["testapp.country"]) == ['["de"]', '["es"]', '["fx"]']
    assert state["testapp.copy"]['["de", "de", "hello"]']["tags"] == [["t-b"], ["t-d"]]
    assert state["testapp.copy"]['["es", "cx", "hello"]']["value"].endswith(" (bulk)")
    assert '["es", "cx", "bye"]' not in state["testapp.copy"]
    assert not any(k.startswith('["it"') for k in state["testapp.language"])
    assert state["testapp.category"]['["grandchild"]']["parent"] == ["root"]
    assert state["testapp.kinds"]['["all"]']["big"] == str(-(2**62))
    # Renames happened in place: same primary keys, so nothing pointing at them cascaded.
    assert pk_of(target, "testapp_country", "code", "fx") == fr_pk
    assert pk_of(target, "testapp_country", "code", "fr") is None
    assert pk_of(target, "testapp_language", "code", "cx") == ca_pk
    assert last_event_id(target) == 0


# ---------------------------------------------------------------------- follow


@over(COVERING_PAIRS)
def test_follow_applies_changes_live_and_stops_on_sigterm(pair: Pair) -> None:
    source, target = pair.source, pair.target
    # Not applied yet when the follower starts: it catches up, then long-polls.
    set_country(source, "f0", "Before follow")
    follower = target.start("changefeed_sync", "src", "--follow", name="follow")
    try:
        wait_until_long_polling(source, follower)
        assert country_name(target, "f0") == "Before follow"

        set_country(source, "f1", "Followed")
        committed = time.monotonic()
        wait_until(lambda: country_name(target, "f1") == "Followed", timeout=5,
                   what="the change to reach the target")
        assert time.monotonic() - committed < 5
        assert follower.poll() is None, follower.output()

        # Idle in a long-poll again; SIGTERM must end it at once, cleanly.
        wait_until_long_polling(source, follower)
        follower.signal(signal.SIGTERM)
        sent = time.monotonic()
        returncode = follower.wait(timeout=5)
        assert time.monotonic() - sent < 5
        assert returncode == 0, follower.output()
        last = last_event_id(source)
        assert f"src: stopped at checkpoint {last}" in follower.stdout()
        assert checkpoint(target) == last
        assert "Traceback" not in follower.stderr()
    finally:
        follower.stop()


@over(COVERING_PAIRS)
def test_follow_survives_source_restart(pair: Pair) -> None:
    source, target = pair.source, pair.target
    set_country(source, "f2", "Before follow")
    follower = target.start("changefeed_sync", "src", "--follow", name="follow-restart")
    try:
        wait_until_long_polling(source, follower)
        source.stop_server()  # cuts the long-poll in flight
        follower.wait_for_output("retrying in", timeout=5)
        # It keeps trying (backoff capped at 1 s by tests/e2e_settings.py) and keeps running.
        wait_until(lambda: follower.stderr().count("retrying in") >= 3, timeout=6,
                   what="more retries")
        assert follower.poll() is None, follower.output()
        assert "Traceback" not in follower.stderr()
        # The error is recorded on the Data Source for the admin to see.
        assert "src" in target.scalar(
            "SELECT last_error FROM changefeed_sync_datasource WHERE name = %s", ["src"]
        )

        # Written while the server is down, delivered once it is back.
        set_country(source, "f3", "During outage")
        source.start_server()  # same port, same database
        wait_until(lambda: country_name(target, "f3") == "During outage", timeout=10,
                   what="the outage change after the restart")
        wait_until_long_polling(source, follower)
        set_country(source, "f3", "After restart")
        committed = time.monotonic()
        wait_until(lambda: country_name(target, "f3") == "After restart", timeout=5,
                   what="a change after the restart")
        assert time.monotonic() - committed < 5
        assert "reachable again" in follower.stderr()
        assert target.scalar(
            "SELECT last_error FROM changefeed_sync_datasource WHERE name = %s", ["src"]
        ) == ""

        wait_until_long_polling(source, follower)
        follower.signal(signal.SIGTERM)
        assert follower.wait(timeout=5) == 0, follower.output()
        assert f"src: stopped at checkpoint {last_event_id(source)}" in follower.stdout()
    finally:
        follower.stop()
        if source.server is None:  # failed while it was down: the next tests need it
            source.start_server()
    assert_same_state(pair)


# ---------------------------------------------------------------------- authentication


@over(COVERING_PAIRS)
def test_wrong_secret_fails_with_credentials_error(pair: Pair) -> None:
    source, target = pair.source, pair.target
    target.run_python(
        DATA_SOURCE.format(name="bad", url=f"{source.url}sync/", secret="not-the-secret")
    )
    result = target.run_django("changefeed_sync", "bad", check=False)
    assert result.returncode != 0, result.stdout
    assert "refused our credentials (HTTP 403)" in result.stderr
    assert "Traceback" not in result.stderr
    assert checkpoint(target, "bad") == 0
    last_error = target.scalar(
        "SELECT last_error FROM changefeed_sync_datasource WHERE name = %s", ["bad"]
    )
    assert "credentials" in last_error


@over(PAIRS)
def test_source_refuses_missing_and_bad_signatures(pair: Pair) -> None:
    source = pair.source
    path = "/sync/feed/?since=0&limit=2"
    url = source.url.rstrip("/") + path

    def get(header: str | None) -> requests.Response:
        headers = {"Authorization": header} if header is not None else {}
        return requests.get(url, headers=headers, timeout=10)

    missing = get(None)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Changefeed"

    for header in [
        sign_request("tgt", ["not-the-secret"], "GET", path),  # wrong secret
        sign_request("nobody", [SECRET], "GET", path),  # unknown target
        sign_request("tgt", [SECRET], "GET", path.replace("limit=2", "limit=3")),  # other URL
        sign_request("tgt", [SECRET], "POST", path),  # other method
        "Changefeed tgt garbage",
        "Bearer whatever",
    ]:
        refused = get(header)
        assert refused.status_code == 403, (header, refused.text)
        assert refused.json()["error"] == "authentication failed"  # no reason leaked
        assert "events" not in refused.json()

    # The same request signed properly is served (so the 403s above are about the header) ...
    good = sign_request("tgt", [SECRET], "GET", path)
    answer = get(good)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["protocol"] == 1 and len(body["events"]) == 2 and body["more"] is True
    # ... once: a replayed header is refused.
    assert get(good).status_code == 403

    # The snapshot endpoint (full Data Pull) is guarded the same way.
    snapshot_path = "/sync/snapshot/"
    snapshot_url = source.url.rstrip("/") + snapshot_path
    assert requests.get(snapshot_url, timeout=10).status_code == 401
    wrong = {"Authorization": sign_request("tgt", ["not-the-secret"], "GET", snapshot_path)}
    assert requests.get(snapshot_url, headers=wrong, timeout=10).status_code == 403

    # The reasons go to the source's log only.
    assert source.server is not None
    refusals = [line for line in source.server.stderr().splitlines() if "refused" in line]
    for reason in [
        "no Authorization header",
        "bad signature for 'tgt'",
        "token of 'tgt' was signed for another request",
        "replayed request",
    ]:
        assert any(reason in line for line in refusals), (reason, refusals)


# ---------------------------------------------------------------------- settings


def test_e2e_settings_parse_database_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CFS_DATABASE_URL", "sqlite:///unused.sqlite3")
    monkeypatch.delitem(sys.modules, "tests.e2e_settings", raising=False)
    settings_module = importlib.import_module("tests.e2e_settings")
    parse = settings_module.parse_database_url
    assert settings_module.DATABASES["default"]["NAME"] == "unused.sqlite3"

    assert parse("sqlite:////var/db/site.sqlite3")["NAME"] == "/var/db/site.sqlite3"
    assert parse("sqlite:///rel/site.sqlite3")["NAME"] == "rel/site.sqlite3"
    pg = parse("postgres://post%40gres:p%2Fw@db.example:6543/my_db")
    assert {k: pg[k] for k in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")} == {
        "ENGINE": "django.db.backends.postgresql", "NAME": "my_db", "USER": "post@gres",
        "PASSWORD": "p/w", "HOST": "db.example", "PORT": "6543",
    }
    assert parse("postgresql://postgres@127.0.0.1/x")["PORT"] == "5432"
    my = parse("mysql://root@127.0.0.1:3306/cfs")
    assert (my["ENGINE"], my["NAME"], my["USER"], my["PASSWORD"], my["PORT"]) == (
        "django.db.backends.mysql", "cfs", "root", "", "3306"
    )
    assert my["OPTIONS"]["charset"] == "utf8mb4"
    assert parse("mariadb://root@localhost/cfs")["ENGINE"] == "django.db.backends.mysql"
    for bad in ["oracle://u@h/db", "postgres://u@h:5432/", "sqlite:///", "not a url"]:
        with pytest.raises(ValueError):
            parse(bad)


# ---------------------------------------------------------------------- SQLite targets


@over([("sqlite", "sqlite")])
def test_sync_waits_for_another_writer_on_a_sqlite_target(pair: Pair) -> None:
    """A target is a live site: its own writes (an admin edit, another sync) must only
    make a sync wait, as they make any plain Django write wait, never fail it."""
    source, target = pair.source, pair.target
    set_country(source, "w1", "While locked")
    seen_before = last_nonce_id(source)
    other_writer = sqlite3.connect(target.sqlite_path, isolation_level=None, timeout=30)
    run = None
    try:
        other_writer.execute("BEGIN IMMEDIATE")
        other_writer.execute("UPDATE testapp_country SET name = name WHERE code = 'de'")
        run = target.start("changefeed_sync", "src", name="sync-while-locked")
        # Once the source served the page, the command applies it (within milliseconds).
        wait_until(lambda: last_nonce_id(source) > seen_before or run.poll() is not None,
                   timeout=15, what="the sync to fetch its page")
        time.sleep(0.5)
        other_writer.execute("COMMIT")
        returncode = run.wait(timeout=30)
        assert returncode == 0, run.output()
        assert country_name(target, "w1") == "While locked"
    finally:
        other_writer.close()
        if run is not None:
            run.stop()
