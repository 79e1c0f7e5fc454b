"""End to end, issue 14: a filtered Target's Data Pull between two real server processes.

The source site (``runserver``, its own database) has a Target with row filters; the
target site runs the real ``manage.py changefeed_pull`` against it, then
``manage.py changefeed_sync`` (tests/servers.py, as tests/test_e2e.py does). The target
must hold exactly the source's rows that the filters select, as the source's ORM
computes them (``Model.objects.filter(**lookups)``), after a first pull, after a
re-pull of rows moved into and out of the filters, and after following the feed
through more such moves (parents renamed and moved, whole subtrees leaving and coming
in). Each backend is a source once and a target once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from changefeed_sync.signing import sign_request
from tests.dbs import require_alias
from tests.servers import ALIAS_OF, Site, free_port
from tests.test_e2e import DUMP_STATE, Pair, _parallel, checkpoint

pytestmark = pytest.mark.timeout(180)

PAIRS = [("sqlite", "postgres"), ("postgres", "mariadb"), ("mariadb", "sqlite")]
SECRET = "e2e-filtered-secret"
IN = ["fr", "be"]
#: A row's own field and a parent's two hops up, as in README's "Filtered Targets".
FILTERS: dict[str, dict[str, Any]] = {
    "testapp.country": {"code__in": IN},
    "testapp.language": {"country__code__in": IN},
    "testapp.copy": {"language__country__code__in": IN, "value__startswith": "pub"},
}

SEED_SOURCE = f"""
from changefeed_sync.models import Target
from tests.testapp.models import Copy, Country, Language, Tag

Target.objects.create(name="regional", secrets={SECRET!r}, row_filters={FILTERS!r})
red = Tag.objects.create(slug="red")
for code in ["fr", "be", "de", "it"]:
    country = Country.objects.create(code=code, name=code.upper())
    for lang in ["l1", "l2"]:
        language = Language.objects.create(country=country, code=lang)
        for k in range(4):
            copy = Copy.objects.create(
                language=language, key=f"k{{k}}", value=("pub " if k % 2 == 0 else "draft ") + code
            )
            if k == 0:
                copy.tags.add(red)
"""

#: Rows into and out of the filters, through their own field and through parents.
EDIT_SOURCE = """
from tests.testapp.models import Copy, Country, Language

fr = Country.objects.get(code="fr")
Copy.objects.filter(language__country=fr, language__code="l1", key="k1").update(value="pub now")
Copy.objects.filter(language__country=fr, language__code="l1", key="k0").update(value="draft")
Language.objects.filter(country__code="de", code="l1").update(country=fr, code="l3")
Language.objects.filter(country__code="be", code="l2").update(
    country=Country.objects.get(code="de"), code="l5"
)
italy = Country.objects.get(code="it")
italy.code = "be"  # after Belgium left: Italy's rows come in under the code
Country.objects.filter(code="be").update(code="bx")
italy.save()
Copy.objects.filter(language__country=fr, key="k2").delete()
"""

#: What the filters select on the source, as the ORM computes it, in DUMP_STATE's form.
FILTERED_STATE = f"""
from changefeed_sync import registry
from changefeed_sync.serialization import payloads_from_db

filters = {FILTERS!r}
out = {{}}
for options in registry.all_options():
    rows = options.model._base_manager.filter(**filters.get(options.label, {{}}))
    payloads = payloads_from_db(options, list(rows.values_list("pk", flat=True)), "default")
    out[options.label] = {{json.dumps(list(p["key"])): p["data"] for p in payloads.values()}}
print(json.dumps(out))
"""

#: More moves, followed through the feed: own fields, a language to another country
#: (save) and back (QuerySet.update), a country leaving with its subtree and another
#: coming in under the freed code, a delete inside.
EDIT_AGAIN = """
from tests.testapp.models import Copy, Country, Language

fr = Country.objects.get(code="fr")
Copy.objects.filter(language__country=fr, language__code="l1", key="k3").update(value="pub again")
Copy.objects.filter(language__country__code="be", key="k0").update(value="draft")
moved = Language.objects.get(country=fr, code="l2")
moved.country = Country.objects.get(code="de")
moved.code = "l7"
moved.save()
Language.objects.filter(country__code="de", code="l5").update(country=fr, code="l6")
italy = Country.objects.get(code="be")
italy.code = "it"
italy.save()
Country.objects.filter(code="bx").update(code="be")
Copy.objects.filter(language__country=fr, key="k1").first().delete()
"""

DATA_SOURCE = f"""
from changefeed_sync.models import DataSource
DataSource.objects.create(name="hq", url={{url!r}}, client_name="regional", secrets={SECRET!r})
"""


@pytest.fixture(params=PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def pair(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Pair]:
    source_backend, target_backend = request.param
    require_alias(ALIAS_OF[source_backend])
    require_alias(ALIAS_OF[target_backend])
    source = Site("src", source_backend, tmp_path)
    target = Site("tgt", target_backend, tmp_path)
    source.port = free_port()
    try:
        for site in (source, target):
            site.start_shell()
            site.create_database()

        def prepare_source() -> None:
            source.migrate()
            source.start_server()
            source.run_python(SEED_SOURCE)

        def prepare_target() -> None:
            target.migrate()
            target.run_python(DATA_SOURCE.format(url=f"{source.url}sync/"))

        _parallel(prepare_source, prepare_target)
        yield Pair(source, target)
    finally:
        for site in (source, target):
            site.close()


def assert_filtered(pair: Pair) -> dict[str, Any]:
    want, got = _parallel(
        lambda: pair.source.run_python(FILTERED_STATE),
        lambda: pair.target.run_python(DUMP_STATE),
    )
    assert got == want, pair.label
    return dict(got)


def pull(target: Site, *args: str) -> str:
    return target.run_django("changefeed_pull", "hq", *args, timeout=120).stdout


def test_a_filtered_target_between_two_servers_by_pulls_then_by_the_feed(pair: Pair) -> None:
    source, target = pair.source, pair.target
    out = pull(target)
    rows = assert_filtered(pair)
    assert "testapp.copy: 8 created" in out, out
    assert sorted(rows["testapp.country"]) == ['["be"]', '["fr"]']
    assert {data["value"] for data in rows["testapp.copy"].values()} == {"pub fr", "pub be"}
    assert len(rows["testapp.tag"]) == 1  # an unfiltered model: every row
    position = checkpoint(target, "hq")
    assert position > 0

    # Kept current by scheduled pulls: rows moved into and out of the filters.
    source.run_python(EDIT_SOURCE)
    pull(target, "--allow-mass-delete")
    rows = assert_filtered(pair)
    assert sorted(rows["testapp.country"]) == ['["be"]', '["fr"]']
    assert '["fr", "l3", "k0"]' in rows["testapp.copy"]  # a German language, now French
    assert '["be", "l2", "k0"]' in rows["testapp.copy"]  # Italy's, and Belgium's l2 gone
    assert rows["testapp.country"]['["be"]']["name"] == "IT"
    assert checkpoint(target, "hq") > position
    position = checkpoint(target, "hq")

    # Then the feed keeps it so: pages of the events routed to it, the rows that
    # left its filters deleted, those that came in upserted, parents first.
    source.run_python(EDIT_AGAIN)
    target.run_django("changefeed_sync", "hq")
    rows = assert_filtered(pair)
    assert sorted(rows["testapp.country"]) == ['["be"]', '["fr"]']
    assert rows["testapp.country"]['["be"]']["name"] == "BE"  # Belgium, back under its code
    assert (
        '["fr", "l6", "k0"]' in rows["testapp.copy"]
        and '["fr", "l2", "k0"]' not in rows["testapp.copy"]
    )
    assert checkpoint(target, "hq") > position
    # What it was sent names no row outside its filters.
    path = f"/sync/feed/?since={position}&limit=1000"
    headers = {"Authorization": sign_request("regional", [SECRET], "GET", path)}
    answer = requests.get(source.url.rstrip("/") + path, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    sent = json.loads(answer.text)["events"]
    assert sent and all(
        e["data"]["value"].startswith("pub")
        for e in sent
        if e["model"] == "testapp.copy" and e["data"]
    )
    assert not any(e["key"][0] in ("de", "it") for e in sent if e["op"] == "upsert")
