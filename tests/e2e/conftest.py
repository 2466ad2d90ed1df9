"""Browser fixtures for the report tests: headless system Chromium driven by Playwright.

Never downloads a browser. Needs `apt-get install -y chromium` (or CHROMIUM_PATH) and
`pip install playwright`; without them every test here is skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _chromium_path():
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the python package playwright: pip install playwright "
                    "(no browser download: the system chromium is used)")
    executable = _chromium_path()
    if executable is None:
        pytest.skip("browser tests need a system Chromium at /usr/bin/chromium: apt-get install -y chromium "
                    "(or set CHROMIUM_PATH)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageProbe:
    """A page plus what it logged: console errors, page errors and every request it made."""

    def __init__(self, page):
        self.page = page
        self.errors = []
        self.requests = []
        page.on("console", lambda msg: self.errors.append(f"console.{msg.type}: {msg.text}")
                if msg.type in ("error", "warning") else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", lambda req: self.requests.append(req.url))

    def open(self, path: Path, fragment: str = "") -> float:
        """Loads the report; returns seconds until its script marked the body ready."""
        start = time.perf_counter()
        self.page.goto(path.resolve().as_uri() + fragment)
        self.page.wait_for_selector("body[data-ready='1']", state="attached", timeout=20_000)
        return time.perf_counter() - start

    def wait_until(self, expression: str, timeout_s: float = 10.0) -> float:
        """Polls a JS expression (the page's CSP forbids the eval behind wait_for_function)."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if self.page.evaluate(expression):
                return time.perf_counter() - start
            time.sleep(0.005)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {expression}")

    def updates(self) -> int:
        return self.page.evaluate("window.__moeReport.updates()")

    def shown(self) -> int:
        return int(self.page.get_attribute("#case-count", "data-shown"))

    def visible_ids(self):
        return self.page.eval_on_selector_all("#case-body tr.case-row", "rows => rows.map(r => r.dataset.case)")

    def external_requests(self):
        return [u for u in self.requests if not u.startswith("file://")]


@pytest.fixture
def probe(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    yield PageProbe(page)
    context.close()


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    """Where screenshots go: $MOE_E2E_ARTIFACTS (CI uploads it) or the test's tmp dir."""
    target = Path(os.environ.get("MOE_E2E_ARTIFACTS") or tmp_path / "artifacts")
    target.mkdir(parents=True, exist_ok=True)
    return target
