"""follow.sync against the feed served over real HTTP by a live server thread.

The source is the "default" database (served by pytest-django's live
server); the target is another database alias in this process.
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import override_settings

from changefeed_sync.exceptions import AuthenticationFailed, SourceUnavailable
from changefeed_sync.models import DataSource, Target
from changefeed_sync.target.follow import sync
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


# ---------------------------------------------------------------------------
# A source that answers what a test tells it to, over real loopback HTTP.


@dataclass
class Answer:
    """One answer of a LoopbackSource: ``cut`` sends half the body and closes the
    connection; ``announce`` says whether a Content-Length goes with it."""

    status: int = 200
    body: bytes = b""
    cut: bool = False
    announce: bool = True
    content_type: str = "application/json"


def page(since: int, events: list[dict[str, Any]], last_seq: int | None = None) -> Answer:
    last = last_seq if last_seq is not None else (events[-1]["seq"] if events else since)
    return Answer(body=json.dumps({
        "protocol": 1, "since": since, "last_seq": last, "more": False, "pending": 0,
        "events": events,
    }).encode())  # fmt: skip


def country(seq: int, code: str, name: str = "", key: list[Any] | None = None) -> dict[str, Any]:
    return {
        "seq": seq, "ts": "2026-01-01T00:00:00+00:00", "model": "testapp.country",
        "op": "upsert", "key": key or [code], "old_key": None,
        "data": {"code": code, "name": name}, "changed": ["code", "name"],
    }  # fmt: skip


class LoopbackSource:
    """An HTTP server on 127.0.0.1 answering every request with the next of
    ``answers`` (then empty pages); records request paths."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = list(answers)
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                owner.paths.append(self.path)
                if owner.answers:
                    answer = owner.answers.pop(0)
                else:  # nothing new: an empty page at the cursor asked for
                    since = parse_qs(urlsplit(self.path).query).get("since", ["0"])[0]
                    answer = page(int(since), [])
                body = answer.body[: len(answer.body) // 2] if answer.cut else answer.body
                head = [f"HTTP/1.1 {answer.status} X", f"Content-Type: {answer.content_type}"]
                if answer.announce:
                    head.append(f"Content-Length: {len(answer.body)}")
                head.append("Connection: close")
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                self.wfile.flush()
                self.close_connection = True  # mid-body when cut

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/sync/"

    def __enter__(self) -> LoopbackSource:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _follow_until(ds: DataSource, alias: str, done: Any, timeout: float = 10.0) -> list[BaseException]:
    """Run a follower in a thread until ``done()``; return what it raised, if anything."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sync(ds, using=alias, follow=True, stop=stop, wait=0.2)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        finally:
            from django.db import connections

            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not errors and not done():
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    return errors


FAST_RETRIES = {"CHANGEFEED_SYNC_RETRY_MIN_DELAY": 0.01, "CHANGEFEED_SYNC_RETRY_MAX_DELAY": 0.05}


@pytest.mark.parametrize("announce", [False, True], ids=["no-length", "content-length"])
def test_a_truncated_answer_is_retried(announce: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11, item 6: the connection closes in the middle of a page's body."""
    good = page(0, [country(1, "tr", "Truncated then whole")])
    with LoopbackSource([Answer(body=good.body, cut=True, announce=announce), good]) as src, \
            override_settings(**FAST_RETRIES):  # fmt: skip
        ds = _source("default", src.url)
        errors = _follow_until(ds, "default", lambda: Country.objects.filter(code="tr").exists())
    assert errors == []
    assert Country.objects.get(code="tr").name == "Truncated then whole"
    ds.refresh_from_db()
    assert ds.checkpoint == 1 and ds.last_error == ""
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retried, caplog.text
    assert ("cut short" if not announce else "127.0.0.1") in retried[0].getMessage()


BAD_ANSWERS = {
    "401": Answer(401, b'{"protocol": 1, "error": "authentication required"}'),
    "403": Answer(403, b'{"protocol": 1, "error": "authentication failed"}'),
    "500": Answer(500, b"<h1>Server Error</h1>", content_type="text/html"),
    "503": Answer(503, b'{"protocol": 1, "error": "down"}'),
    "html-200": Answer(200, b"<html>captive portal</html>", content_type="text/html"),
    "list-200": Answer(200, b"[1, 2]"),
    "no-events": Answer(200, b'{"protocol": 1, "since": 0, "last_seq": 0, "more": false}'),
    "protocol-2": Answer(200, b'{"protocol": 2}'),
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
def test_a_follower_survives_what_the_source_may_recover_from(name: str) -> None:
    """Issue 11, item 2: 401/403/5xx/garbled answers are recorded on the Data Source
    (shown by changefeed_status) and retried; the follower goes on once the source
    answers properly again."""
    from django.core.management import call_command

    bad = BAD_ANSWERS[name]
    with LoopbackSource([bad]) as src:
        ds = _source("default", src.url)
        with pytest.raises(Exception):  # noqa: B017 - any error, recorded below
            sync(ds, using="default")  # once, not following: the error is raised
    ds.refresh_from_db()
    assert ds.last_error and ds.last_error_at is not None and ds.checkpoint == 0
    out = io.StringIO()
    call_command("changefeed_status", stdout=out)
    assert f"last error ({ds.last_error_at.isoformat()}): {ds.last_error}" in out.getvalue()

    good = page(0, [country(1, "ok")])
    with LoopbackSource([bad, bad, bad, good]) as src, override_settings(**FAST_RETRIES):
        DataSource.objects.filter(pk=ds.pk).update(url=src.url)
        ds.refresh_from_db()
        errors = _follow_until(ds, "default", lambda: Country.objects.filter(code="ok").exists())
        assert len(src.paths) >= 4
    assert errors == []
    ds.refresh_from_db()
    assert ds.checkpoint == 1 and ds.last_error == ""


def test_a_configuration_error_ends_a_follower_at_once() -> None:
    """Only a configuration error ends it: a URL that cannot be requested, no secret."""
    from changefeed_sync.exceptions import ConfigurationError

    for url, secret in [("not a url", "s3cret"), ("ftp://127.0.0.1/sync/", "s3cret"),
                        ("http://127.0.0.1:9/sync/", "")]:  # fmt: skip
        ds = DataSource.objects.create(
            name=f"bad{len(url)}{len(secret)}", url=url, client_name="regional", secrets=secret
        )
        errors = _follow_until(ds, "default", lambda: False, timeout=5)
        assert len(errors) == 1 and isinstance(errors[0], ConfigurationError), errors
        ds.refresh_from_db()
        assert ds.last_error
