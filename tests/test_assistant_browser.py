"""The assistant's pages in headless Chromium: a customer asks, is handed to a person, an agent answers.

Uses the web chat's browser fixture (Debian's chromium and chromedriver, installed by
scripts/install-browser.sh; skipped without them, a failure in CI) and the assistant server
of test_assistant_server.py. LMFORGE_ASSISTANT_SCREENSHOTS=DIR keeps the two screenshots.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import test_webui_browser
from test_assistant_server import server  # noqa: F401  (the live assistant, a fixture)

pytestmark = pytest.mark.slow
browser = test_webui_browser.browser  # the web chat's fixture, shared


def test_customer_and_agent_pages(browser, server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, assistant = server
    shots = Path(os.environ.get("LMFORGE_ASSISTANT_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    order_id = assistant.orders.order_ids("shipped")[0]
    d = browser
    d.get(url + "/assistant")
    customer = d.current_window_handle

    def say(text: str, replies: int) -> None:
        box = d.find_element(By.ID, "text")
        box.send_keys(text)
        d.find_element(By.ID, "send").click()
        WebDriverWait(d, 60, poll_frequency=0.1).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .assistant, #log .agent")) >= replies)

    say(f"Where is my order {order_id}?", 1)
    first = d.find_elements(By.CSS_SELECTOR, "#log .assistant")[0].text
    assert order_id in first and "tracking" in first
    d.find_elements(By.CSS_SELECTOR, "#log .assistant button")[0].click()  # thumbs up
    WebDriverWait(d, 30).until(lambda d: "thanks" in d.find_elements(By.CSS_SELECTOR, "#log .assistant button")[0].text)
    say("I want to talk to a human", 2)
    WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "state").get_attribute("data-state") == "waiting")

    d.switch_to.new_window("window")
    d.get(url + "/agent")
    d.find_element(By.ID, "agent").clear()
    d.find_element(By.ID, "agent").send_keys("maria")
    WebDriverWait(d, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#queue button.take"))
    d.find_elements(By.CSS_SELECTOR, "#queue button.take")[-1].click()
    WebDriverWait(d, 30).until(lambda d: any("I want to talk to a human" in m.text
                                             for m in d.find_elements(By.CSS_SELECTOR, "#log .msg")))
    d.find_element(By.ID, "text").send_keys("Hi, Maria here. How can I help?")
    d.find_element(By.CSS_SELECTOR, "#reply button").click()
    WebDriverWait(d, 30).until(lambda d: any("Maria here" in m.text for m in d.find_elements(By.CSS_SELECTOR, "#log .agent")))
    assert d.save_screenshot(str(shots / "assistant-agent.png"))

    d.switch_to.window(customer)
    WebDriverWait(d, 30, poll_frequency=0.2).until(
        lambda d: any("Maria here" in m.text for m in d.find_elements(By.CSS_SELECTOR, "#log .agent")))
    assert d.find_element(By.ID, "state").get_attribute("data-state") == "human"
    assert d.save_screenshot(str(shots / "assistant-chat.png"))
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    ratings = assistant.conversations.db.query("SELECT rating FROM ratings")
    assert {"rating": 1} in ratings
