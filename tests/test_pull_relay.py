"""A Full Data Pull into a relay (a target that is itself a source: it has an active
Target) passes what it wrote on through its own outbox, so A -> B -> C stays whole.

Real servers and databases as in tests/test_pull.py: A serves its feed over HTTP
(this process's SQLite database through the live server, or PostgreSQL from a
``SourceProcess``), B pulls from it, and C follows B's outbox with tests.helpers.pump.
Each chain has B on another backend: SQLite, PostgreSQL or MariaDB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from changefeed_sync.exceptions import SourceUnavailable
from changefeed_sync.models import DataPull, DataSource, Event, Target
from changefeed_sync.target.pull import Progress, digests, execute, run_pull
from tests import test_pull
from tests.dbs import require_alias
from tests.helpers import data_source, events, pump, state
from tests.test_pull import SourceProcess, _seed
from tests.testapp.models import Category, Copy, Country, Language

# The fixtures of tests/test_pull.py.
documents = test_pull.documents
source_process = test_pull.source_process

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(180),
]


@pytest.fixture
def small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows per bucket, as in tests/test_pull_digests.py: a few changes leave most
    buckets of these small tables equal, so that a re-pull asks for few rows."""
    monkeypatch.setattr(digests, "ROWS_PER_BUCKET", 2)


@dataclass
class Chain:
    a: str  # the alias A's feed is served from
    b: str  # the relay, pulling from A
    c: str  # a target of B
    ds: DataSource  # A, as B's source
    process: SourceProcess | None  # A's process, when A is not this process

    def follow(self, limit: int = 1000) -> None:
        """C applies B's outbox from where it stopped."""
        ds = DataSource.objects.using(self.c).filter(name="b").first() or data_source(
            self.c, name="b"
        )
        pump(self.b, self.c, ds, limit=limit)


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def chain(request: pytest.FixtureRequest) -> Iterator[Chain]:
    """B is named by the parameter; B has an active Target (C), so it relays."""
    b = {"sqlite": "default", "postgres": "postgres", "mariadb": "mariadb"}[request.param]
    c = "postgres" if b == "mariadb" else "mariadb"
    require_alias(c)
    process: SourceProcess | None = None
    if b == "default":
        # SQLite can only be B here if A is another process: PostgreSQL's.
        process = request.getfixturevalue("source_process")
        a, url = "postgres", process.url
    else:
        require_alias(b)
        live_server = request.getfixturevalue("live_server")
        a, url = "default", live_server.url + "/sync/"
        Target.objects.using(a).create(name="t", secrets="pw")
    ds = DataSource.objects.using(b).create(name="a", url=url, client_name="t", secrets="pw")
    Target.objects.using(b).create(name="c", secrets="pw")
    yield Chain(a, b, c, ds, process)


def _rows(alias: str) -> dict[tuple[str, tuple[Any, ...]], dict[str, Any]]:
    return {
        (label, key): data for label, rows in state(alias).items() for key, data in rows.items()
    }


def _after(alias: str, mark: int) -> list[Event]:
    return [e for e in events(alias) if (e.position or 0) > mark]


def _last_id(alias: str) -> int:
    found = events(alias)
    return (found[-1].position or 0) if found else 0


def test_first_pull_relays_every_row(chain: Chain) -> None:
    _seed(using=chain.a)
    with CaptureQueriesContext(connections[chain.b]) as queries:
        run_pull(chain.ds, using=chain.b)
    # SQLite: its write lock before the first row is written (a transaction that reads,
    # then writes, fails at once if another writer got in between). Elsewhere the pull
    # takes no lock that local writers wait for.
    sql = [q["sql"].lower() for q in queries.captured_queries]
    first_row = next(i for i, q in enumerate(sql) if "into" in q and "testapp_" in q)
    locks = [i for i, q in enumerate(sql) if "pg_advisory" in q or "outboxstate" in q]
    if connections[chain.b].vendor == "sqlite":
        assert locks and locks[0] < first_row
    else:
        assert not [sql[i] for i in locks if i < first_row]
    assert state(chain.b) == state(chain.a)
    relayed = events(chain.b)
    assert all(e.op == Event.UPSERT and e.old_key is None and e.changed is None for e in relayed)
    # One event per row write, with the row's key and data: the last one of each row
    # is the row. "kid" points at "root", of the same page: written with its parent
    # null (rows of a page are written at once), then set by the second pass.
    rows = _rows(chain.b)
    assert {(e.model, tuple(e.key)): e.data for e in relayed} == rows
    assert len(relayed) == len(rows) + 1
    first, last = [(e.model, e.key, e.data) for e in relayed if e.key == ["kid"]]
    assert first == ("testapp.category", ["kid"], {"slug": "kid", "parent": None})
    assert last == ("testapp.category", ["kid"], {"slug": "kid", "parent": ["root"]})
    assert relayed[-1].key == ["kid"]
    # In the order the pull wrote them: models parents first, each model's rows together.
    labels = [e.model for e in relayed[:-1]]
    blocks = [label for i, label in enumerate(labels) if i == 0 or labels[i - 1] != label]
    assert len(blocks) == len(set(blocks)) == len({label for label, _ in rows})
    for parent, child in [
        ("testapp.country", "testapp.language"),
        ("testapp.language", "testapp.copy"),
        ("testapp.tag", "testapp.copy"),
    ]:
        assert blocks.index(parent) < blocks.index(child)
    chain.follow()
    assert state(chain.c) == state(chain.a)


def test_repull_relays_only_what_changed(chain: Chain, small_buckets: None, settings: Any) -> None:
    """A re-pull compared by digests: an update, an insert, a delete, and later a
    cascade of deletes; the rows left as they were (most of them, and the neighbours
    in the buckets that differ) are not passed on."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 7
    a = chain.a
    _seed(countries=4, keys=30, using=a)
    run_pull(chain.ds, using=chain.b)
    chain.follow()
    mark = _last_id(chain.b)

    c1 = Language.objects.using(a).get(country__code="c1")
    Copy.objects.using(a).filter(language=c1, key="k3").update(value="new value")
    Copy.objects.using(a).create(language=c1, key="k-new", value="inserted")
    Copy.objects.using(a).filter(language=c1, key="k4").delete()
    Country.objects.using(a).filter(code="c2").update(name="Renamed")
    _, counts = run_pull(chain.ds, using=chain.b)
    assert counts["testapp.copy"] == {"created": 1, "updated": 1, "deleted": 1, "unchanged": 118}
    assert counts["testapp.country"] == {"created": 0, "updated": 1, "deleted": 0, "unchanged": 3}
    rows = _rows(chain.b)
    relayed = _after(chain.b, mark)
    assert [(e.model, e.op, e.key, e.data) for e in relayed] == [
        ("testapp.country", "upsert", ["c2"], rows[("testapp.country", ("c2",))]),
        ("testapp.copy", "upsert", ["c1", "xx", "k3"], rows[("testapp.copy", ("c1", "xx", "k3"))]),
        (
            "testapp.copy",
            "upsert",
            ["c1", "xx", "k-new"],
            rows[("testapp.copy", ("c1", "xx", "k-new"))],
        ),
        ("testapp.copy", "delete", ["c1", "xx", "k4"], None),
    ]
    assert all(e.old_key is None and e.changed is None for e in relayed)
    chain.follow()
    assert state(chain.c) == state(a)

    # A country deleted on A takes its language and copies with it: B deletes the rows
    # A lacks children first, and so do its events.
    mark = _last_id(chain.b)
    Country.objects.using(a).filter(code="c3").delete()
    _, counts = run_pull(chain.ds, using=chain.b)
    assert counts["testapp.copy"]["deleted"] == 30
    relayed = _after(chain.b, mark)
    assert {e.op for e in relayed} == {"delete"}
    assert [(e.model, e.key) for e in relayed[-2:]] == [
        ("testapp.language", ["c3", "xx"]),
        ("testapp.country", ["c3"]),
    ]
    assert sorted(e.key[2] for e in relayed[:-2] if e.model == "testapp.copy") == sorted(
        f"k{k}" for k in range(30)
    )
    assert len(relayed) == 32
    chain.follow()
    assert state(chain.c) == state(a)

    # Nothing changed: nothing passed on.
    mark = _last_id(chain.b)
    run_pull(chain.ds, using=chain.b)
    assert _after(chain.b, mark) == []


def test_rows_set_by_the_second_pass_are_relayed_once_set(chain: Chain, settings: Any) -> None:
    """Rows pointing at rows read later (a later page, a cycle) are written with the key
    null first, then set by the second pass: the events say the same, so that C never
    meets a key to a row it does not have yet; a row written once has one event."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 2
    a = chain.a
    kids = [Category.objects.using(a).create(slug=f"kid{i}") for i in range(5)]
    root = Category.objects.using(a).create(slug="root")  # the last page
    Category.objects.using(a).filter(pk__in=[k.pk for k in kids]).update(parent=root)
    Category.objects.using(a).create(slug="filler")  # x last of a page, y on the next one
    x, y = Category.objects.using(a).create(slug="x"), Category.objects.using(a).create(slug="y")
    Category.objects.using(a).filter(pk=x.pk).update(parent=y)
    Category.objects.using(a).filter(pk=y.pk).update(parent=x)
    run_pull(chain.ds, using=chain.b)
    assert state(chain.b) == state(a)
    relayed: dict[str, list[Any]] = {}
    for e in events(chain.b):
        assert e.model == "testapp.category" and e.op == "upsert"
        relayed.setdefault(e.key[0], []).append(e.data["parent"])
    assert relayed == {
        **{f"kid{i}": [None, ["root"]] for i in range(5)},
        "root": [None],
        "filler": [None],
        "x": [None, ["y"]],  # y was not there yet
        "y": [["x"]],  # x was: written once, one event
    }
    # One event per feed page: C applies each write as B made it (a page coalesces
    # each row's events into its last one, and apply.py cannot write a cycle of new
    # rows from one page).
    chain.follow(limit=1)
    assert state(chain.c) == state(a)


def test_no_events_on_a_target_that_is_not_a_relay(chain: Chain) -> None:
    Target.objects.using(chain.b).update(active=False)
    _seed(using=chain.a)
    with CaptureQueriesContext(connections[chain.b]) as queries:
        _, counts = run_pull(chain.ds, using=chain.b)
    assert counts["testapp.copy"]["created"] == 15
    assert state(chain.b) == state(chain.a)
    assert events(chain.b) == []
    # Not even the outbox lock.
    sql = " ".join(q["sql"] for q in queries.captured_queries).lower()
    assert "changefeed_sync_event" not in sql
    assert "pg_advisory" not in sql and "changefeed_sync_outboxstate" not in sql


def test_dry_run_relays_nothing(chain: Chain) -> None:
    _seed(using=chain.a)
    run_pull(chain.ds, using=chain.b)
    mark = _last_id(chain.b)
    Copy.objects.using(chain.a).filter(key="k0").update(value="changed")
    Country.objects.using(chain.a).create(code="zz")
    Copy.objects.using(chain.a).filter(key="k1").delete()
    before = state(chain.b)
    _, counts = run_pull(chain.ds, using=chain.b, dry_run=True)
    assert counts["testapp.copy"] == {"created": 0, "updated": 3, "deleted": 3, "unchanged": 9}
    assert state(chain.b) == before
    assert _after(chain.b, mark) == []
    # The real pull passes the same changes on.
    run_pull(chain.ds, using=chain.b)
    assert len(_after(chain.b, mark)) == 3 + 1 + 3


def test_a_failed_pull_leaves_no_events(chain: Chain, settings: Any) -> None:
    """Events are written page by page in the pull's transaction: a pull that fails
    after some pages were written leaves neither their rows nor their events. On a
    server database B refuses a row; on SQLite (which does not enforce max_length)
    A's process is killed after the first page."""
    settings.CHANGEFEED_SYNC_PULL_PAGE_SIZE = 2
    _seed(using=chain.a)
    written: list[int] = []  # B's events as the pull's own connection sees them

    def watch(p: Progress) -> None:
        if p.phase == "read":
            written.append(Event.objects.using(chain.b).count())
            if chain.process is not None and len(written) == 1:
                chain.process.stop()

    if chain.process is not None:
        with pytest.raises(SourceUnavailable):
            run_pull(chain.ds, using=chain.b, progress=watch)
        assert written == [2]  # the first page's events, inside the transaction
        assert events(chain.b) == []
        assert all(rows == {} for rows in state(chain.b).values())
        chain.ds.refresh_from_db(using=chain.b)
        assert chain.ds.checkpoint == 0
        return
    run_pull(chain.ds, using=chain.b)
    before, mark = state(chain.b), _last_id(chain.b)
    n = len(events(chain.b))
    Category.objects.using(chain.a).create(slug="new")  # pulled first, then rolled back
    Country.objects.using(chain.a).create(code="abc")  # too long for B's column
    record = execute(DataPull.objects.using(chain.b).create(source=chain.ds), using=chain.b,
                     progress=watch)  # fmt: skip
    assert record.status == DataPull.FAILED, record.error
    assert max(written) == n + 1  # the new category's event, inside the transaction
    assert state(chain.b) == before
    assert _after(chain.b, mark) == []
