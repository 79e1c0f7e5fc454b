"""A Target limited to some models (``Target.models``) reads those models only, on
every endpoint, through real HTTP (a live server: this process's SQLite "default" as
the source), and a request for another model gets the answer an unknown one gets.
A full Data Pull by such a Target copies those models and deletes nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from django.core.files.base import ContentFile

import changefeed_sync
from changefeed_sync.models import DataSource, Target
from changefeed_sync.signing import sign_request
from changefeed_sync.source import file_serving
from changefeed_sync.target.follow import sync
from changefeed_sync.target.pull import run_pull
from tests.dbs import require_alias
from tests.helpers import state
from tests.testapp.models import Category, Copy, Country, Document, Language, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(120),
]

SECRET = "restricted-target-secret"


@pytest.fixture
def documents(settings: Any, tmp_path: Path) -> Iterator[None]:
    """Document with its file field registered here, which the live server serves."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
    changefeed_sync.register(Document, natural_key=["slug"], file_fields=["attachment"])
    yield
    changefeed_sync.unregister(Document)


class Endpoint:
    def __init__(self, base: str, name: str) -> None:
        self.base = base
        self.name = name

    def get(self, path: str, **params: Any) -> requests.Response:
        path = f"/sync/{path}" + (f"?{urlencode(params)}" if params else "")
        auth = sign_request(self.name, [SECRET], "GET", path)
        return requests.get(self.base + path, headers={"Authorization": auth}, timeout=30)

    def post(self, path: str, body: bytes) -> requests.Response:
        path = f"/sync/{path}"
        auth = sign_request(self.name, [SECRET], "POST", path, body)
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        return requests.post(self.base + path, data=body, headers=headers, timeout=30)


@pytest.fixture
def seeded(live_server, documents: None) -> tuple[Endpoint, Endpoint]:  # type: ignore[no-untyped-def]
    """(a Target limited to countries, a Target of every model), a little of everything."""
    Target.objects.create(name="countries", secrets=SECRET, model_labels=["testapp.country"])
    Target.objects.create(name="all", secrets=SECRET)
    fr = Country.objects.create(code="fr", name="France")
    lang = Language.objects.create(country=fr, code="fr")
    Copy.objects.create(language=lang, key="hello", value="Bonjour")
    Tag.objects.create(slug="red")
    doc = Document(slug="secret-doc")
    doc.attachment.save("secret.txt", ContentFile(b"not for countries"), save=True)
    assert doc.attachment.name == "docs/secret.txt"
    return Endpoint(live_server.url, "countries"), Endpoint(live_server.url, "all")


def test_snapshot_start_lists_only_the_targets_models(seeded: tuple[Endpoint, Endpoint]) -> None:
    countries, everything = seeded
    body = countries.get("snapshot/").json()
    assert body["models"] == ["testapp.country"]
    assert body["counts"] == {"testapp.country": 1}
    assert set(everything.get("snapshot/").json()["models"]) >= {
        "testapp.country", "testapp.copy", "testapp.document", "testapp.tag",
    }  # fmt: skip


def _same(refused: requests.Response, unknown: requests.Response, label: str) -> None:
    assert refused.status_code == unknown.status_code == 404
    assert refused.json()["code"] == "unknown_model"
    # The one difference: the label each request named, quoted back.
    assert refused.text.replace(label, "X") == unknown.text.replace("nosuch.model", "X")


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"after": "1"},
        {"after": "not a primary key"},
        {"limit": "1", "digest": "16"},
        {"limit": "1", "buckets": "8", "only": "AQ"},
        {"digest": "99999999"},
    ],
    ids=["page", "after", "bad after", "digest", "buckets", "bad digest"],
)
def test_snapshot_of_another_model_is_refused_as_if_unknown(
    seeded: tuple[Endpoint, Endpoint], extra: dict[str, str]
) -> None:
    countries, everything = seeded
    for label in ("testapp.copy", "testapp.document", "testapp.tag", "changefeed_sync.target"):
        refused = countries.get("snapshot/", model=label, **extra)
        unknown = countries.get("snapshot/", model="nosuch.model", **extra)
        _same(refused, unknown, label)
        assert "Bonjour" not in refused.text and "secret" not in refused.text
    assert countries.get("snapshot/", model="testapp.country").json()["rows"][0]["key"] == ["fr"]
    # The unrestricted Target still reads them.
    assert (
        everything.get("snapshot/", model="testapp.copy").json()["rows"][0]["data"]["value"]
        == "Bonjour"
    )


def test_files_of_another_model_are_refused_as_a_bad_token(
    seeded: tuple[Endpoint, Endpoint],
) -> None:
    countries, everything = seeded
    page = everything.get("snapshot/", model="testapp.document").json()
    token = page["rows"][0]["files"]["attachment"]["token"]
    assert everything.get("files/", t=token).content == b"not for countries"
    # A snapshot token works for the Target it was listed to only...
    stolen = countries.get("files/", t=token)
    # ...and a token of another model, however obtained, is refused like a forged one.
    unbound = file_serving._token("testapp.document", "attachment", "docs/secret.txt")
    bound = file_serving._token("testapp.document", "attachment", "docs/secret.txt", "countries")
    forged = countries.get("files/", t="forged")
    for answer in (stolen, countries.get("files/", t=unbound), countries.get("files/", t=bound)):
        assert answer.status_code == 403
        assert answer.text == forged.text
        assert b"not for countries" not in answer.content
    assert forged.json()["code"] == "bad_file_token"
    # The unrestricted Target may use an unbound token; POST files/ refuses as before.
    assert everything.get("files/", t=unbound).status_code == 200
    item = {"model": "testapp.document", "key": ["secret-doc"], "field": "attachment",
            "name": "docs/secret.txt"}  # fmt: skip
    body = json.dumps({"protocol": 1, "files": [item]}).encode()
    assert countries.post("files/", body).json()["files"] == [{"status": "refused"}]
    assert everything.post("files/", body).json()["files"][0]["status"] == "ok"


def test_feed_carries_only_the_targets_models(seeded: tuple[Endpoint, Endpoint]) -> None:
    countries, _ = seeded
    events = countries.get("feed/", since=0).json()["events"]
    assert {e["model"] for e in events} == {"testapp.country"}


@pytest.mark.parametrize("labels", [["TestApp.Country"], ["testapp.country", "nosuch.model"]])
def test_labels_are_matched_case_insensitively_and_unknown_ones_ignored(
    seeded: tuple[Endpoint, Endpoint], labels: list[str]
) -> None:
    countries, _ = seeded
    Target.objects.filter(name="countries").update(model_labels=labels)
    assert countries.get("snapshot/").json()["models"] == ["testapp.country"]
    assert {e["model"] for e in countries.get("feed/", since=0).json()["events"]} == {
        "testapp.country"
    }


def test_models_that_are_not_a_list_restrict_to_nothing(seeded: tuple[Endpoint, Endpoint]) -> None:
    countries, _ = seeded
    Target.objects.filter(name="countries").update(model_labels={"testapp.copy": True})
    assert countries.get("snapshot/").json()["models"] == []
    assert countries.get("feed/", since=0).json()["events"] == []
    assert countries.get("snapshot/", model="testapp.copy").status_code == 404


# ---------------------------------------------------------------- a restricted full pull


@pytest.fixture(params=["postgres", "mariadb"])
def tgt(request: pytest.FixtureRequest) -> str:
    require_alias(request.param)
    return str(request.param)


def test_a_restricted_pull_copies_its_models_and_deletes_no_other(
    live_server,
    tgt: str,  # type: ignore[no-untyped-def]
) -> None:
    """Pulled: countries and languages. The target's own tags, categories and copies
    (models the source did not list) stay, even where the source has none of them;
    its countries the source lacks are deleted, as the feed would."""
    Target.objects.create(
        name="regional", secrets=SECRET, model_labels=["testapp.country", "testapp.language"]
    )
    fr = Country.objects.create(code="fr", name="France")
    Language.objects.create(country=fr, code="fr", name="French")
    Country.objects.create(code="de", name="Germany")
    Tag.objects.create(slug="source-tag")
    # The target: rows of unlisted models (some the source has no counterpart of),
    # a country and a language the source lacks, a stale name.
    t_fr = Country.objects.using(tgt).create(code="fr", name="old name")
    t_lang = Language.objects.using(tgt).create(country=t_fr, code="fr")
    Copy.objects.using(tgt).create(language=t_lang, key="local", value="kept")
    Tag.objects.using(tgt).create(slug="local-tag")
    Category.objects.using(tgt).create(slug="local-category")
    Country.objects.using(tgt).create(code="it", name="Italy (gone on the source)")
    Country.objects.using(tgt).create(code="es")  # more than half would go: allowed below
    ds = DataSource.objects.using(tgt).create(
        name="hq", url=live_server.url + "/sync/", client_name="regional", secrets=SECRET
    )
    position, counts = run_pull(ds, using=tgt, allow_mass_delete=True)
    assert set(counts) == {"testapp.country", "testapp.language"}
    pulled = state(tgt)
    source = state("default")
    for label in ("testapp.country", "testapp.language"):
        assert pulled[label] == source[label], label
    assert set(Tag.objects.using(tgt).values_list("slug", flat=True)) == {"local-tag"}
    assert list(Category.objects.using(tgt).values_list("slug", flat=True)) == ["local-category"]
    assert list(Copy.objects.using(tgt).values_list("value", flat=True)) == ["kept"]
    ds.refresh_from_db(using=tgt)
    assert ds.checkpoint == position
    # The feed goes on from there with those models only.
    Country.objects.create(code="nz")
    Tag.objects.create(slug="not-sent")
    result = sync(ds, using=tgt)
    assert result.stats.events == 1
    assert Country.objects.using(tgt).filter(code="nz").exists()
    assert not Tag.objects.using(tgt).filter(slug="not-sent").exists()


# ---------------------------------------------------------------- webhook names


def test_the_webhook_answers_alike_for_known_and_unknown_sources(
    live_server,
    tgt: str,
    settings: Any,  # type: ignore[no-untyped-def]
) -> None:
    """Without the shared secret nothing tells whether a Data Source of that name exists,
    nor whether it takes Cloud Tasks' OIDC tokens; no answer lists the names."""
    settings.CHANGEFEED_SYNC_TARGET_DATABASE = tgt
    DataSource.objects.using(tgt).create(
        name="hq", url="http://127.0.0.1:1/sync/", client_name="regional", secrets=SECRET
    )
    DataSource.objects.using(tgt).create(
        name="tasks", url="http://127.0.0.1:1/sync/", client_name="regional", secrets=SECRET,
        oidc_service_account="tasks@example.iam.gserviceaccount.com",
    )  # fmt: skip
    body = b'{"protocol": 1, "since": 0, "last_seq": 0, "events": []}'

    def post(name: str, signer: tuple[str, str] | None) -> tuple[int, str]:
        path = f"/sync/webhook/{name}/"
        headers = {"Content-Type": "application/json"}
        if signer is not None:
            headers["X-Changefeed-Signature"] = sign_request(
                signer[0], [signer[1]], "POST", path, body
            )
        answer = requests.post(live_server.url + path, data=body, headers=headers, timeout=10)
        return answer.status_code, answer.text

    for signer, status in [
        (None, 401),
        (("regional", "a wrong secret"), 403),
        (("someone", SECRET), 403),
    ]:
        answers = {post(name, signer) for name in ("hq", "tasks", "nosuch", "x" * 300)}
        assert len(answers) == 1, (signer, answers)
        [(code, text)] = answers
        assert code == status
        assert "hq" not in text and "tasks" not in text and "nosuch" not in text
    assert Country.objects.using(tgt).count() == 0
    # With the secret: the plain source accepts, the OIDC one wants its token.
    assert post("hq", ("regional", SECRET))[0] == 200
    assert post("tasks", ("regional", SECRET))[0] == 401
