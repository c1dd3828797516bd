"""Headless Chromium (Debian's chromium + chromedriver) opens the built book from 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _chromium():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian chromium/chromium-driver not installed (make test installs them where apt-get works)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def server(smoke_book):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(smoke_book["html"]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _wait_for_plots(drv, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, timeout).until(
        lambda d: d.execute_script(
            "const g=[...document.querySelectorAll('.brainsex-plotly')];"
            "return g.length>0 && g.every(x => x.querySelector('svg.main-svg'));"
        )
    )


def test_overview_plotly_figure_draws_offline(browser, server):
    browser.get(f"{server}/notebooks/00_overview.html")
    _wait_for_plots(browser)
    n_points = browser.execute_script(
        "return document.querySelectorAll('.plotly-graph-div g.trace path.point, .plotly-graph-div g.bars path').length;"
    )
    assert n_points > 0
    assert browser.execute_script("return typeof window.Plotly") == "object"
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert not severe, severe


def _chapter_pages(smoke_book, repo_root):
    from brainsex.book import toc_notebooks

    return [f"notebooks/{nb.stem}.html" for nb in toc_notebooks(repo_root)]


def test_every_chapter_draws_without_console_errors(browser, server, smoke_book, repo_root):
    for page in _chapter_pages(smoke_book, repo_root):
        browser.get(f"{server}/{page}")
        has_plots = browser.execute_script("return document.querySelectorAll('.brainsex-plotly').length > 0")
        if has_plots:
            _wait_for_plots(browser)
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
        assert not severe, (page, severe)


def test_slice_viewer_slider_changes_the_slice(browser, server):
    browser.get(f"{server}/notebooks/05_saliency.html")
    _wait_for_plots(browser)
    script = """
    const gd = [...document.querySelectorAll('.plotly-graph-div')].find(g => (g.layout.sliders || []).length > 0);
    if (!gd) return null;
    const before = gd.data.map(t => t.visible);
    const step = gd.layout.sliders[0].steps[gd.layout.sliders[0].steps.length - 1];
    return Plotly.restyle(gd, step.args[0], step.args[1]).then(() => {
        const after = gd.data.map(t => t.visible);
        return JSON.stringify(before) !== JSON.stringify(after);
    });
    """
    changed = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"Promise.resolve((function(){{{script}}})()).then(done);"
    )
    assert changed is True


def test_exercise_solution_toggles(browser, server):
    """Solutions are hidden by default (sphinx-togglebutton) and open with their toggle button."""
    import time

    browser.get(f"{server}/notebooks/04_tiv.html")
    time.sleep(1)
    get = "return document.querySelector('.solution.dropdown').className"
    assert "toggle-hidden" in browser.execute_script(get)
    browser.execute_script("document.querySelector('.solution.dropdown button.toggle-button').click()")
    time.sleep(0.5)
    assert "toggle-hidden" not in browser.execute_script(get)
