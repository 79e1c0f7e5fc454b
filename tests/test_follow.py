"""follow.sync against the feed served over real HTTP by a live server thread.

The source is the "default" database (served by pytest-django's live
server); the target is another database alias in this process.
"""

from __future__ import annotations

import threading
import time

import pytest

from changefeed_sync.exceptions import AuthenticationFailed, SourceUnavailable
from changefeed_sync.follow import sync
from changefeed_sync.models import DataSource, Target
from tests.dbs import require_alias
from tests.helpers import state
from tests.testapp.models import Copy, Country, Language

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(params=["postgres", "mariadb"])
def target_alias(request: pytest.FixtureRequest) -> str:
    require_alias(request.param)
    return str(request.param)


def _source(alias: str, url: str, secret: str = "s3cret") -> DataSource:
    return DataSource.objects.using(alias).create(
        name="hq", url=url, client_name="regional", secrets=secret
    )


def test_sync_catches_up_over_http(live_server, target_alias: str) -> None:  # type: ignore[no-untyped-def]
    Target.objects.create(name="regional", secrets="s3cret")
    fr = Country.objects.create(code="fr")
    lang = Language.objects.create(country=fr, code="fr")
    for i in range(25):
        Copy.objects.create(language=lang, key=f"k{i}", value=str(i))
    ds = _source(target_alias, live_server.url + "/sync/")
    result = sync(ds, using=target_alias, limit=10)
    assert result.pages == 3
    assert state(target_alias) == state("default")
    Copy.objects.filter(key="k3").update(value="changed")
    result = sync(ds, using=target_alias)
    assert result.stats.events == 1
    assert Copy.objects.using(target_alias).get(key="k3").value == "changed"


def test_follow_sees_new_events_quickly(live_server, target_alias: str) -> None:  # type: ignore[no-untyped-def]
    Target.objects.create(name="regional", secrets="s3cret")
    ds = _source(target_alias, live_server.url + "/sync/")
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sync(ds, using=target_alias, follow=True, stop=stop, wait=2.0)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            from django.db import connections

            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        time.sleep(0.3)
        Country.objects.create(code="nz")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if Country.objects.using(target_alias).filter(code="nz").exists():
                break
            time.sleep(0.02)
        else:
            pytest.fail("the change did not reach the target within 3 s")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors == []


def test_wrong_secret_is_an_authentication_error(live_server, target_alias: str) -> None:  # type: ignore[no-untyped-def]
    Target.objects.create(name="regional", secrets="right")
    ds = _source(target_alias, live_server.url + "/sync/", secret="wrong")
    with pytest.raises(AuthenticationFailed, match="regional"):
        sync(ds, using=target_alias)
    ds.refresh_from_db(using=target_alias)
    assert "refused our credentials" in ds.last_error
    assert ds.checkpoint == 0


def test_unreachable_source_is_reported(target_alias: str) -> None:
    ds = _source(target_alias, "http://127.0.0.1:9/sync/")
    with pytest.raises(SourceUnavailable):
        sync(ds, using=target_alias)
    ds.refresh_from_db(using=target_alias)
    assert "127.0.0.1:9" in ds.last_error
