"""The admin in a real browser: headless Chromium against the demo's two sites.

The two sites of example_pair/ run as real servers (runserver, two processes, each with
its own SQLite file); Debian's Chromium is driven through Debian's chromedriver with
Selenium (nothing is downloaded: the paths are given, so Selenium Manager never runs).
A person's path through the admin:

1. on the source, add the Target (name, secret, webhook URL);
2. on the target, add the Data Source through its form, then a Data Pull, and reload
   the pull's page until it succeeded; the copies are in the target's admin;
3. edit a copy in the source's admin and watch it arrive in the target's admin (pushed).

Screenshots of every step go to tests/artifacts/browser/ (not committed). No page may
ever show the shared secret. Without Chromium this test is skipped, or fails under CI.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import dbs
from tests.servers import REPO_ROOT, Background, free_port, wait_until

pytestmark = pytest.mark.timeout(150)

CHROMIUM = os.environ.get("CFS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CFS_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "browser"
PASSWORD = "browser-test-password"
SECRET = secrets.token_urlsafe(32)  # must never appear in a page
NEW_VALUE = "Bienvenue, depuis le navigateur !"


def _missing(reason: str) -> None:
    if dbs.in_ci():
        pytest.fail(f"{reason}; under CI=true the browser test must run (see .ci/run)")
    pytest.skip(reason)


def _require_browser() -> None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            _missing(f"{path} not found (apt-get install {package})")
    for module, name in (("selenium", "selenium"), ("PIL", "Pillow")):
        try:
            __import__(module)
        except ImportError:
            _missing(f"{name} is not installed (the 'test' dependency group has it)")


# ---------------------------------------------------------------- the two sites


@dataclass
class DemoSite:
    role: str
    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    server: Background | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def manage(self, *args: str) -> list[str]:
        return [sys.executable, str(REPO_ROOT / "example_pair" / self.role / "manage.py"), *args]

    def start(self) -> None:
        self.server = Background(
            self.manage("runserver", f"127.0.0.1:{self.port}", "--noreload"),
            self.env,
            self.workdir,
            f"{self.role}-server",
        )
        wait_until(self._listening, timeout=30, what=f"the {self.role} server")

    def _listening(self) -> bool:
        import socket

        assert self.server is not None
        if self.server.poll() is not None:
            raise AssertionError(f"the {self.role} server exited\n{self.server.output()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


def _run_together(commands: list[tuple[DemoSite, list[str]]]) -> None:
    """manage.py commands of both sites at once (the machine has two cores)."""
    running = [
        (
            site,
            subprocess.Popen(
                site.manage(*args),
                cwd=REPO_ROOT,
                env=site.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for site, args in commands
    ]
    for site, process in running:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{site.role}: {process.args}\n{output}"


@pytest.fixture(scope="module")
def sites() -> Iterator[tuple[DemoSite, DemoSite]]:
    _require_browser()
    workdir = Path(tempfile.mkdtemp(prefix="cfs-browser-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EXAMPLE_PAIR_", "DJANGO_")) and not k.endswith("DATABASE_URL")
    }
    env.update(
        EXAMPLE_PAIR_VAR=str(workdir / "var"),
        EXAMPLE_PAIR_PASSWORD=PASSWORD,
        PYTHONUNBUFFERED="1",
    )
    source, target = DemoSite("source", env, workdir), DemoSite("target", env, workdir)
    try:
        _run_together(
            [
                (source, ["migrate", "--noinput", "-v", "0"]),
                (target, ["migrate", "--noinput", "-v", "0"]),
            ]
        )
        # The admin user on both sites and the demo content on the source; the Target
        # and the Data Source are what the browser adds.
        _run_together(
            [
                (source, ["demo_setup", "--admin", "admin", "--demo-data"]),
                (target, ["demo_setup", "--admin", "admin"]),
            ]
        )
        source.start()
        target.start()
        yield source, target
    finally:
        for site in (source, target):
            if site.server is not None:
                site.server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- the browser


class Browser:
    """A thin layer over Selenium: every page visited is kept, screenshots are numbered."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.pages: dict[str, str] = {}  # url -> html, for the secret check
        self.shots = 0

    def get(self, url: str) -> None:
        self.driver.get(url)
        self._seen()

    def _seen(self) -> None:
        self.pages[self.driver.current_url] = self.driver.page_source

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def fill(self, **fields: str) -> None:
        for name, value in fields.items():
            element = self.find(f"#id_{name}")
            element.clear()
            element.send_keys(value)

    def select(self, name: str, text: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.find(f"#id_{name}")).select_by_visible_text(text)

    def submit(self, css: str = "input[name=_save], input[type=submit]") -> None:
        """Click a submit button and wait for the next page."""
        self.click(self.find(css))

    def click(self, element: Any) -> None:
        """Click a link or button and wait until the next page replaced this one."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        old = self.find("html")
        element.click()
        WebDriverWait(self.driver, 20).until(expected_conditions.staleness_of(old))
        self._seen()

    def text(self) -> str:
        return str(self.find("body").text)

    def errors(self) -> str:
        return "\n".join(e.text for e in self.finds(".errornote, .errorlist"))

    def screenshot(self, name: str) -> Path:
        """The whole page (the window is resized to its height first)."""
        self.shots += 1
        self.driver.set_window_size(1400, 800)  # shrink first: a page is at least as tall
        height, frame = self.driver.execute_script(
            "return [document.documentElement.scrollHeight,"
            " window.outerHeight - window.innerHeight]"
        )
        self.driver.set_window_size(1400, min(int(height), 4000) + int(frame))
        path = ARTIFACTS / f"{self.shots:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def reload_until(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        def reloaded() -> bool:
            self.driver.refresh()
            self._seen()
            return check()

        wait_until(reloaded, timeout=timeout, interval=0.5, what=what)

    def login(self, site: DemoSite) -> None:
        self.get(f"{site.url}admin/login/?next=/admin/")
        self.fill(username="admin", password=PASSWORD)
        self.submit()
        assert "Site administration" in self.text(), self.text()


@pytest.fixture(scope="module")
def browser(sites: tuple[DemoSite, DemoSite]) -> Iterator[Browser]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    profile = tempfile.mkdtemp(prefix="cfs-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    log = ARTIFACTS / "chromedriver.log"
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(log)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------- the test


def test_admin_pull_and_push_in_a_browser(
    sites: tuple[DemoSite, DemoSite], browser: Browser
) -> None:
    source, target = sites
    b = browser
    webhook = f"{target.url}sync/webhook/source/"

    # 1. Source: allow the target to read the feed, and push to its webhook.
    b.login(source)
    b.screenshot("source-admin-index")
    b.get(f"{source.url}admin/changefeed_sync/target/add/")
    b.fill(name="target", new_secrets=SECRET, webhook_url=webhook)
    b.screenshot("source-target-add-form")
    b.submit()
    assert not b.errors(), b.errors()
    assert "was added successfully" in b.text(), b.text()
    b.screenshot("source-targets-list")

    # 2. Target: the Data Source, through its form.
    b.login(target)
    b.get(f"{target.url}admin/changefeed_sync/datasource/add/")
    b.fill(name="source", url=f"{source.url}sync/", client_name="target", new_secrets=SECRET)
    b.screenshot("target-datasource-add-form")
    b.submit()
    assert not b.errors(), b.errors()
    assert "was added successfully" in b.text(), b.text()
    b.screenshot("target-datasources-list")

    # A Data Pull; it runs in the server after the admin's transaction commits.
    b.get(f"{target.url}admin/changefeed_sync/datapull/add/")
    b.select("source", "source")
    b.screenshot("target-datapull-add-form")
    b.submit()
    assert not b.errors(), b.errors()
    b.screenshot("target-datapulls-list")
    b.click(b.find("#result_list tbody tr th a"))
    b.reload_until(
        lambda: "succeeded" in b.find(".field-status").text or "failed" in b.text(),
        timeout=30,
        what="the Data Pull to finish",
    )
    b.screenshot("target-datapull-finished")
    assert "succeeded" in b.find(".field-status").text, b.text()
    assert "demo.copy" in b.find(".field-counts").text, b.text()

    # The rows are there: the target's copies, searched by key.
    b.get(f"{target.url}admin/demo/copy/?q=welcome")
    b.screenshot("target-copies-after-pull")
    rows = b.finds("#result_list tbody tr")
    assert len(rows) == 6, b.text()
    assert "Bienvenue !" in b.text() and "Καλώς ήρθατε!" in b.text()

    # 3. Edit a copy in the source's admin ...
    b.get(f"{source.url}admin/demo/copy/?q=welcome")
    b.screenshot("source-copies")
    link = next(a for a in b.finds("#result_list tbody tr th a") if a.text == "fr/fr/welcome")
    b.click(link)
    b.fill(value=NEW_VALUE)
    b.screenshot("source-copy-edit-form")
    b.submit()
    assert not b.errors(), b.errors()
    assert "was changed successfully" in b.text(), b.text()
    b.screenshot("source-copy-saved")

    # ... and see it arrive on the target (pushed to its webhook by the source's server).
    started = time.monotonic()
    b.get(f"{target.url}admin/demo/copy/?q=welcome")
    b.reload_until(lambda: NEW_VALUE in b.text(), timeout=20, what="the edit on the target")
    b.screenshot("target-copies-after-edit")
    assert time.monotonic() - started < 20

    # What the operators see afterwards: the source's outbox and Targets, the target's
    # Data Sources (checkpoint moved) and its pulls.
    b.get(f"{source.url}admin/changefeed_sync/event/")
    b.screenshot("source-outbox-events")
    assert "demo.copy" in b.text()
    # Searching the outbox by natural key; an event is a read-only record.
    b.get(f"{source.url}admin/changefeed_sync/event/?q=welcome")
    keys = [row.text for row in b.finds("#result_list tbody td.field-key")]
    assert keys and all("welcome" in key for key in keys), keys
    assert len(keys) == 7  # six created by the demo data, one edited in the browser
    b.screenshot("source-outbox-search")
    b.click(b.find("#result_list tbody tr th a"))
    b.screenshot("source-outbox-event-page")
    assert NEW_VALUE in b.text()  # the newest first: the browser's edit
    assert not b.finds("input[name=_save]") and not b.finds(".deletelink")
    b.get(f"{source.url}admin/changefeed_sync/target/")
    b.screenshot("source-targets-after-push")
    b.click(b.find("#result_list tbody tr th a"))
    b.screenshot("source-target-page")
    b.get(b.driver.current_url.replace("/change/", "/history/"))  # names fields, not values
    assert "Added." in b.text(), b.text()
    b.get(f"{target.url}admin/changefeed_sync/datasource/")
    b.screenshot("target-datasources-after-push")
    b.click(b.find("#result_list tbody tr th a"))
    b.screenshot("target-datasource-page")
    b.get(f"{target.url}admin/changefeed_sync/datapull/")
    b.screenshot("target-datapulls-after")

    # No page, form or list ever rendered the shared secret.
    leaked = [url for url, html in b.pages.items() if SECRET in html]
    assert leaked == [], leaked
    assert len(b.pages) >= 15
