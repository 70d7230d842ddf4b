"""The /dashboard page in headless Chromium: the data loads, the tiles fill, the charts are drawn.

Uses the web chat's browser fixture (Debian's chromium and chromedriver, installed by
scripts/install-browser.sh; skipped without them, a failure in CI). Set
LMFORGE_DASHBOARD_SCREENSHOT=path.png to keep the screenshot.
"""

from __future__ import annotations

import os

import httpx
import pytest
import test_webui_browser
from test_monitor_server import tiny_scheduler

from conftest import live_server
from lmforge.monitor.activity import Price
from lmforge.serve.app import ServeSettings, create_app

pytestmark = pytest.mark.slow
browser = test_webui_browser.browser  # the web chat's fixture, shared


def test_dashboard_renders_in_a_browser(browser, tmp_path):
    from lmforge.model.loading import resolve_tokenizer
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tokenizer = resolve_tokenizer(None)
    scheduler = tiny_scheduler(tokenizer)
    app = create_app(scheduler, tokenizer, "tiny", ServeSettings(embedding_model="none"),
                     prices={"tiny": Price(0.5, 1.5)})
    metrics = app.state.server.metrics
    with live_server(app, scheduler) as url:
        for i in range(3):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": f"Hi {i}"}],
                                                                 "max_tokens": 8, "temperature": 0}, timeout=60)
            assert r.status_code == 200
        for intent in ("shipping", "shipping", "returns"):
            metrics.count_intent(intent)
        metrics.count_blocked("input")

        d = browser
        d.get(url + "/dashboard")
        WebDriverWait(d, 30, poll_frequency=0.1).until(
            lambda d: d.find_element(By.ID, "updated").get_attribute("data-loaded") == "true")
        assert d.title == "lmforge dashboard"
        assert d.find_element(By.ID, "model").text == "tiny"
        tiles = {t.get_attribute("data-label"): t.find_element(By.CLASS_NAME, "value").text
                 for t in d.find_elements(By.CSS_SELECTOR, "#tiles .tile")}
        assert int(tiles["requests"]) >= 3 and tiles["drift"] == "not watched"
        assert tiles["cost (USD)"] not in ("–", "0.0000")
        rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "#table-intents tr")]
        assert rows == ["shipping 2", "returns 1"]
        # Every chart has drawn pixels beyond its grid: count distinct colours on the canvas.
        colours = d.execute_script("""
            return [...document.querySelectorAll('canvas')].map(c => {
              const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              const seen = new Set();
              for (let i = 0; i < data.length; i += 16) seen.add(data[i] + ',' + data[i+1] + ',' + data[i+2] + ',' + data[i+3]);
              return seen.size;
            });""")
        assert len(colours) == 6 and min(colours) >= 3, colours
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        shot = os.environ.get("LMFORGE_DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png")
        assert d.save_screenshot(shot) and os.path.getsize(shot) > 10_000
