"""Push under faults, with real processes: the end state equals the source's every time.

Two sites of tests/servers.py on SQLite, each with its own ``runserver``. The source's
writes come from a writer process (a long-lived Python process with the source's
settings, like an application server's worker): the inline backend delivers from a
thread of the process that committed, right after the commit. The source's server
serves the feed that the target pulls when a pushed batch starts beyond its
checkpoint, and its admin's "Retry delivery now" delivers from the server process.

Between the source and the target's webhook sits a proxy in this test process
(127.0.0.1) that records every delivery and can forward it, refuse it (503), lose it
(answer 200 without forwarding: the source believes it was delivered) or hold it
until the test lets it go. Captured deliveries are posted again, duplicated and in
other orders; the target's server is stopped and started; the writer is killed
while a delivery is in flight.

The sites are shared by the tests of this module (set up once), which run in file
order; each test ends with the target equal to the source.
"""

from __future__ import annotations

import json
import random
import re
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from changefeed_sync.signing import SIGNATURE_HEADER, sign_request
from tests.dbs import require_alias
from tests.servers import Shell, Site, wait_until

pytestmark = pytest.mark.timeout(180)

SECRET = "faults-secret"
WEBHOOK_PATH = "/sync/webhook/src/"

ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-pw"

DUMP_STATE = """
from tests.helpers import state
print(json.dumps({
    label: {json.dumps(list(key)): data for key, data in rows.items()}
    for label, rows in state("default").items()
}))
"""


# ---------------------------------------------------------------------- the proxy


@dataclass
class Delivery:
    """One webhook request as the source sent it, and what became of it."""

    headers: dict[str, str]
    body: bytes
    mode: str
    status: int | None = None
    answer: dict[str, Any] | None = None

    @property
    def batch(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def span(self) -> tuple[int, int]:
        return int(self.batch["since"]), int(self.batch["last_seq"])


@dataclass
class Proxy:
    """Between the source and the target's webhook: records, forwards or misbehaves."""

    upstream: str  # the target server's base URL, without a trailing slash
    mode: str = "forward"  # forward | refuse | lose | hold
    deliveries: list[Delivery] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    release_as: str = "forward"  # what a held delivery becomes: forward | drop
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in {"host", "content-length", "connection"}}
        with self._lock:
            delivery = Delivery(headers, body, self.mode)
            self.deliveries.append(delivery)
        mode = delivery.mode
        if mode == "hold":
            self.released.wait(30)
            mode = self.release_as
        if mode == "drop":  # the connection dies without an answer
            handler.close_connection = True
            return
        if mode == "refuse":
            status, answer = 503, {"error": "proxy: target refusing"}
        elif mode == "lose":
            status, answer = 200, {"status": "applied", "lost": True}
        else:
            try:
                forwarded = requests.post(
                    self.upstream + handler.path, data=body, headers=headers, timeout=30
                )
                status, answer = forwarded.status_code, forwarded.json()
            except requests.RequestException as exc:
                status, answer = 502, {"error": f"proxy: {exc}"}
        delivery.status, delivery.answer = status, answer
        data = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def since(self, index: int) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries[index:])


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    state = Proxy(upstream="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            state.handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------- the sites


class Writer:
    """A source process that writes (and so delivers, inline, from one of its threads)."""

    def __init__(self, site: Site, name: str) -> None:
        self.shell = Shell(site.env(), site.workdir, f"src-{name}")

    def run(self, code: str) -> None:
        self.shell.run(textwrap.dedent(code), timeout=60)

    def kill(self) -> None:
        """SIGKILL: no clean-up, the delivery in flight is abandoned."""
        self.shell.process.kill()
        self.shell.process.wait(10)
        self.shell.stop()


@dataclass
class Sites:
    source: Site
    target: Site
    proxy: Proxy
    workdir: Path
    writers: list[Writer] = field(default_factory=list)

    def writer(self) -> Writer:
        writer = Writer(self.source, f"writer-{len(self.writers) + 1}")
        self.writers.append(writer)
        return writer

    @property
    def current(self) -> Writer:
        return self.writers[-1]

    def write(self, code: str) -> int:
        """Run ``code`` in the current writer; return the last event id after it."""
        self.current.run(code)
        return last_event_id(self.source)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, proxy: Proxy) -> Iterator[Sites]:
    require_alias("default")
    workdir = tmp_path_factory.mktemp("push-faults")
    source, target = Site("src", "sqlite", workdir), Site("tgt", "sqlite", workdir)
    result = Sites(source, target, proxy, workdir)
    try:
        for site in (source, target):
            site.start_shell()
            site.create_database()
        threads = [threading.Thread(target=site.migrate) for site in (source, target)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        source.start_server()
        target.start_server()
        proxy.upstream = target.url.rstrip("/")
        source.run_python(f"""
            from django.contrib.auth.models import User
            from changefeed_sync.models import Target
            Target.objects.create(name="tgt", secrets={SECRET!r},
                                  webhook_url={proxy.url + WEBHOOK_PATH!r})
            User.objects.create_superuser({ADMIN_USER!r}, "admin@example.com", {ADMIN_PASSWORD!r})
        """)
        target.run_python(f"""
            from changefeed_sync.models import DataSource
            DataSource.objects.create(name="src", url={source.url + "sync/"!r},
                                      client_name="tgt", secrets={SECRET!r})
        """)
        result.writer()
        yield result
    finally:
        for writer in result.writers:
            writer.shell.stop()
        for site in (source, target):
            site.close()


@pytest.fixture
def s(sites: Sites) -> Iterator[Sites]:
    """The shared sites, the proxy forwarding, and a live writer."""
    sites.proxy.mode = "forward"
    sites.proxy.released.clear()
    if sites.current.shell.process.poll() is not None:
        sites.writer()
    yield sites
    sites.proxy.mode = "forward"
    sites.proxy.released.set()


# ---------------------------------------------------------------------- helpers


def last_event_id(site: Site) -> int:
    """The feed position of the site's newest event (positions are given after commit)."""
    return int(site.run_python("from changefeed_sync.source import feed; print(feed.head('default'))"))


def checkpoint(target: Site) -> int:
    return int(target.scalar("SELECT checkpoint FROM changefeed_sync_datasource WHERE name = 'src'"))


def target_row(source: Site) -> dict[str, Any]:
    rows = source.query(
        "SELECT delivered_seq, failures, last_error FROM changefeed_sync_target WHERE name = 'tgt'"
    )
    delivered, failures, error = rows[0]
    return {"delivered_seq": int(delivered), "failures": int(failures), "last_error": error}


def wait_for_checkpoint(s: Sites, seq: int, timeout: float = 15.0) -> None:
    wait_until(lambda: checkpoint(s.target) == seq, timeout=timeout,
               what=f"the target's checkpoint to reach {seq}")


def wait_for_delivered(s: Sites, seq: int) -> None:
    """Until the source recorded a delivery up to ``seq`` (its answer came back)."""
    wait_until(lambda: target_row(s.source)["delivered_seq"] >= seq, timeout=15,
               what=f"the source to record a delivery up to {seq}")


def assert_same_state(s: Sites) -> None:
    wait_for_checkpoint(s, last_event_id(s.source))
    src = s.source.run_python(DUMP_STATE)
    tgt = s.target.run_python(DUMP_STATE)
    for label in sorted(set(src) | set(tgt)):
        assert src.get(label) == tgt.get(label), f"{label} differs"


def countries(code_names: dict[str, str]) -> str:
    return "from tests.testapp.models import Country\n" + "".join(
        f"Country.objects.update_or_create(code={code!r}, defaults={{'name': {name!r}}})\n"
        for code, name in code_names.items()
    )


def post(s: Sites, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(s.target.url.rstrip("/") + WEBHOOK_PATH, data=body, headers=headers,
                         timeout=30)


def resigned(delivery: Delivery) -> dict[str, str]:
    """The same body with a fresh signature, as a second sender or enqueue would send it."""
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign_request("tgt", [SECRET], "POST", WEBHOOK_PATH, delivery.body),
    }


# ---------------------------------------------------------------------- tests


def test_every_commit_is_pushed_and_applied(s: Sites) -> None:
    start = len(s.proxy.deliveries)
    s.write(countries({"fr": "France", "de": "Deutschland"}))
    s.write("""
        from tests.testapp.models import Country, Copy, Language, Tag
        fr = Country.objects.get(code="fr")
        lang = Language.objects.create(country=fr, code="fr", name="Français")
        copy = Copy.objects.create(language=lang, key="hello", value="Bonjour")
        copy.tags.add(Tag.objects.create(slug="greeting"))
    """)
    last = s.write(countries({"de": "Germany"}))
    wait_for_checkpoint(s, last)
    wait_for_delivered(s, last)
    assert_same_state(s)
    sent = s.proxy.since(start)
    assert sent and all(d.status == 200 for d in sent), [(d.status, d.answer) for d in sent]
    # In order, without gaps: each batch starts where the one before ended.
    spans = [d.span for d in sent]
    assert spans[0][0] == 0 and spans[-1][1] == last
    assert all(b[0] == a[1] for a, b in zip(spans, spans[1:])), spans
    assert target_row(s.source) == {"delivered_seq": last, "failures": 0, "last_error": ""}


def test_duplicated_and_reordered_deliveries_converge(s: Sites) -> None:
    start = len(s.proxy.deliveries)
    for i in range(4):  # one delivery each
        wait_for_delivered(s, s.write(countries({f"r{i}": f"reordered {i}"})))
    captured = s.proxy.since(start)
    assert len(captured) == 4
    assert_same_state(s)
    before = checkpoint(s.target)

    # The very same requests again, newest first: refused as replays or acknowledged,
    # never applied twice, never a server error.
    for delivery in reversed(captured):
        answer = post(s, delivery.body, delivery.headers)
        assert answer.status_code in (200, 409), answer.text
        if answer.status_code == 200:
            assert answer.json()["status"] == "duplicate"
    # The same batches freshly signed (a second sender, or at-least-once delivery),
    # each twice, shuffled: acknowledged as duplicates.
    copies = captured * 2
    random.Random(4).shuffle(copies)
    for delivery in copies:
        answer = post(s, delivery.body, resigned(delivery))
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "duplicate"
    assert checkpoint(s.target) == before
    assert_same_state(s)


def test_lost_and_late_deliveries_converge_through_the_feed(s: Sites) -> None:
    """Deliveries lost after the source counted them as delivered, then posted late and
    out of order: a batch from beyond the checkpoint makes the target pull the feed."""
    start = len(s.proxy.deliveries)
    before = checkpoint(s.target)
    s.proxy.mode = "lose"
    for i in range(4):  # one delivery each; the source believes they arrived
        wait_for_delivered(s, s.write(countries({f"l{i}": f"lost {i}"})))
    lost = s.proxy.since(start)
    assert checkpoint(s.target) == before  # nothing arrived

    # The newest first: it starts beyond the checkpoint, so the target catches up from
    # the source's feed; the older ones are then duplicates.
    newest, *older = list(reversed(lost))
    answer = post(s, newest.body, resigned(newest))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "caught_up"
    for delivery in older:
        answer = post(s, delivery.body, resigned(delivery))
        assert answer.json()["status"] == "duplicate", answer.text
    assert_same_state(s)

    # Lost again, and nobody posts them late: the next push starts beyond the gap.
    s.proxy.mode = "lose"
    wait_for_delivered(s, s.write(countries({"l0": "lost again"})))
    s.proxy.mode = "forward"
    mark = len(s.proxy.deliveries)
    last = s.write(countries({"l1": "after the gap"}))
    wait_for_delivered(s, last)  # the answer came back through the proxy
    [after_gap] = [d for d in s.proxy.since(mark) if d.mode == "forward"]
    assert after_gap.answer is not None and after_gap.answer["status"] == "caught_up"
    assert_same_state(s)


def test_target_down_for_a_while_then_back(s: Sites) -> None:
    """The target's server stops; the source's delivery fails, is recorded, and is retried
    after the backoff (5 s after a first failure by default) once the target is back."""
    s.target.stop_server()
    try:
        last = s.write(countries({"d1": "while the target is down"}))
        wait_until(lambda: target_row(s.source)["failures"] >= 1, timeout=10,
                   what="the failed delivery to be recorded")
        row = target_row(s.source)
        assert row["failures"] == 1 and "HTTP 502" in row["last_error"], row
        assert row["delivered_seq"] < last
    finally:
        s.target.start_server()
    wait_for_checkpoint(s, last, timeout=20)
    wait_until(lambda: target_row(s.source)["failures"] == 0, timeout=5,
               what="the failure count to be reset")
    assert target_row(s.source) == {"delivered_seq": last, "failures": 0, "last_error": ""}
    assert_same_state(s)


def test_target_refusing_for_a_while_then_accepting(s: Sites) -> None:
    s.proxy.mode = "refuse"
    start = len(s.proxy.deliveries)
    last = s.write(countries({"d2": "refused at first"}))
    wait_until(lambda: target_row(s.source)["failures"] >= 1, timeout=10,
               what="the refused delivery to be recorded")
    assert "HTTP 503" in target_row(s.source)["last_error"]
    # More commits during the backoff wait for it: no attempt, no second failure.
    s.write(countries({"d3": "during the backoff"}))
    assert target_row(s.source)["failures"] == 1
    s.proxy.mode = "forward"
    last = last_event_id(s.source)
    wait_for_checkpoint(s, last, timeout=20)
    wait_for_delivered(s, last)
    attempts = s.proxy.since(start)
    assert [d.mode for d in attempts][:1] == ["refuse"] and attempts[-1].status == 200
    assert len(attempts) == 2, [(d.mode, d.span) for d in attempts]  # one refused, one retry
    assert_same_state(s)


def test_source_killed_mid_delivery_then_restarted(s: Sites) -> None:
    """The writer dies while its delivery is in flight; the target still gets that request
    (the source never learns it did). The next source process delivers from where the
    source's records stand: the target applies only what it lacks."""
    s.proxy.mode = "hold"
    s.proxy.release_as = "forward"
    start = len(s.proxy.deliveries)
    delivered_before = target_row(s.source)["delivered_seq"]
    last = s.write(countries({"k1": "in flight when the source died"}))
    wait_until(lambda: len(s.proxy.since(start)) == 1, timeout=10,
               what="the delivery to reach the proxy")
    s.current.kill()
    s.proxy.released.set()  # the orphaned request reaches the target after all
    wait_for_checkpoint(s, last)
    assert target_row(s.source)["delivered_seq"] == delivered_before  # never acknowledged

    s.proxy.mode = "forward"
    s.writer()
    mark = len(s.proxy.deliveries)
    newer = s.write(countries({"k2": "written by the restarted source"}))
    wait_for_delivered(s, newer)
    [redelivery] = s.proxy.since(mark)
    assert redelivery.span == (delivered_before, newer)  # resent from its own record
    assert redelivery.answer is not None and redelivery.answer["status"] == "applied"
    assert redelivery.answer["applied"] == newer - last  # only what the target lacked
    assert_same_state(s)


def admin_retry_now(source: Site) -> requests.Response:
    """Log in to the source's admin and run the "Retry delivery now" action on "tgt"."""
    session = requests.Session()
    base = source.url.rstrip("/")
    login = f"{base}/admin/login/"
    session.get(login, timeout=10)
    answer = session.post(login, data={
        "username": ADMIN_USER, "password": ADMIN_PASSWORD, "next": "/admin/",
        "csrfmiddlewaretoken": session.cookies["csrftoken"],
    }, headers={"Referer": login}, timeout=10)
    assert answer.status_code == 200 and "Log out" in answer.text, answer.text[:500]
    changelist = f"{base}/admin/changefeed_sync/target/"
    page = session.get(changelist, timeout=10).text
    pk = re.search(r'name="_selected_action" value="(\d+)"', page)
    assert pk, page[:2000]
    return session.post(changelist, data={
        "action": "retry_now", "_selected_action": pk.group(1), "index": "0",
        "csrfmiddlewaretoken": session.cookies["csrftoken"],
    }, headers={"Referer": changelist}, timeout=30)


def _kill_writer_mid_delivery(s: Sites, code: str) -> int:
    """Write, hold the delivery at the proxy, kill the writer, drop the request."""
    s.proxy.mode = "hold"
    s.proxy.release_as = "drop"
    start = len(s.proxy.deliveries)
    last = s.write(code)
    wait_until(lambda: len(s.proxy.since(start)) == 1, timeout=10,
               what="the delivery to reach the proxy")
    s.current.kill()
    s.proxy.released.set()
    s.proxy.mode = "forward"
    return last


def test_a_restarted_source_resumes_a_delivery_that_died_in_flight(s: Sites) -> None:
    last = _kill_writer_mid_delivery(s, countries({"k3": "died in flight"}))
    s.source.stop_server()
    s.source.start_server()
    s.writer()
    # The application is back and serves requests, but nothing new is written.
    assert requests.get(f"{s.source.url}admin/login/", timeout=10).status_code == 200
    wait_for_checkpoint(s, last, timeout=8)


def test_admin_retry_now_delivers_from_the_source_server(s: Sites) -> None:
    last = _kill_writer_mid_delivery(s, countries({"k4": "retried from the admin"}))
    s.writer()
    assert checkpoint(s.target) < last
    mark = len(s.proxy.deliveries)
    answer = admin_retry_now(s.source)
    assert answer.status_code == 200 and "Deliveries scheduled for 1 target" in answer.text
    wait_for_delivered(s, last)
    assert [d.status for d in s.proxy.since(mark)] == [200]
    assert target_row(s.source) == {"delivered_seq": last, "failures": 0, "last_error": ""}
    assert_same_state(s)
    server = s.source.server
    assert server is not None and "Traceback" not in server.stderr()
