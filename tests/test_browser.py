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
