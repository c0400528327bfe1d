"""The playground in a real headless browser (Debian's chromium, driven over WebDriver by
Selenium through chromedriver) against real generation and feedback services on the test broker:
sign in, ask, watch the answer stream in, press thumbs-up, rank two answers, write a better one,
and find each piece of feedback accepted on the feedback topic for its generation id. Then the
server's own defences, without a browser."""

import shutil
import tempfile

import pytest
import requests
from prometheus_client import REGISTRY
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from rlhf import bus
from rlhf.broker import free_port
from rlhf.checkpoints import CheckpointStore
from rlhf.config import AuthSettings
from rlhf.v1 import events_pb2
from services.feedback.config import FeedbackConfig
from services.feedback.main import FeedbackService
from services.generation.main import GenerationService
from services.playground.config import PlaygroundConfig
from services.playground.main import PlaygroundService
from tests.conftest import (
    API_KEY,
    ID_KEY,
    READER_KEY,
    TENANT,
    consume_all,
    serve,
    tiny_generation_config,
)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver not installed (Debian packages chromium, chromium-driver; "
    "`make system-packages`)",
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture(scope="module")
def platform(broker, tmp_path_factory, cache_dir):
    """Generation (keys required on its HTTP API), feedback and the playground, on loopback."""
    store = CheckpointStore(tmp_path_factory.mktemp("checkpoints"))
    keys = (f"{TENANT}={API_KEY}",)
    generation = serve(
        GenerationService(
            tiny_generation_config(
                broker, store.root, cache_dir, max_new_tokens_limit=32, api_keys=keys
            )
        )
    )
    feedback = serve(
        FeedbackService(
            FeedbackConfig(
                kafka_bootstrap=broker.bootstrap,
                grpc_host="127.0.0.1",
                generation_id_key=ID_KEY,
                api_keys=keys,
                http_port=0,
            )
        )
    )
    nobody = f"127.0.0.1:{free_port()}"  # no trainer runs here: the panel says so
    playground = serve(
        PlaygroundService(
            PlaygroundConfig(
                grpc_host="127.0.0.1",
                http_port=0,
                generation_url=f"http://127.0.0.1:{generation.service.http.port}",
                feedback_url=f"http://127.0.0.1:{feedback.service.http.port}/v1/feedback",
                generation_address=f"127.0.0.1:{generation.port}",
                trainer_address=nobody,
                reward_trainer_address=nobody,
                feedback_metrics_url=f"http://127.0.0.1:{feedback.metrics_port}/metrics",
                max_new_tokens=16,
                status_every_seconds=0.5,
                auth=AuthSettings(client_key=READER_KEY),  # the panel reads as a reader
            )
        )
    )
    yield f"http://127.0.0.1:{playground.service.http.port}"
    for running in (playground, feedback, generation):
        running.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="rlhf-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _finished_answers(driver, count):
    cards = driver.find_elements(By.CSS_SELECTOR, ".answer[data-generation-id]")
    return cards if len(cards) >= count else False


def _feedback_for(broker, generation_id):
    return [
        r.message
        for r in consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
        if r.message.feedback.generation_id == generation_id
    ]


def _ask(driver, prompt, two=False):
    box = driver.find_element(By.ID, "two-answers")
    if box.is_selected() != two:
        box.click()
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    driver.find_element(By.ID, "send").click()


def test_a_person_chats_and_rates_answers(platform, browser, broker):
    browser.get(platform)
    _wait(browser, lambda d: d.find_element(By.ID, "sign-in-form").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys("a-wrong-key-of-enough-length")
    browser.find_element(By.ID, "sign-in").click()
    _wait(browser, lambda d: "refused" in d.find_element(By.ID, "sign-in-error").text)
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "sign-in").click()
    _wait(browser, lambda d: d.find_element(By.ID, "ask-form").is_displayed())
    # The key is nowhere the page's scripts can read it.
    assert API_KEY not in browser.page_source
    assert browser.execute_script("return document.cookie") == ""

    _ask(browser, "Tell me about the sea.")
    [card] = _wait(browser, lambda d: _finished_answers(d, 1))
    text = card.find_element(By.CLASS_NAME, "answer-text")
    assert text.text.strip(), "no answer was shown"
    assert int(card.get_attribute("data-deltas")) > 1, "the answer did not stream in"
    assert text.find_elements(By.CSS_SELECTOR, "*") == []  # model text is text, never markup
    generation_id = card.get_attribute("data-generation-id")
    version = card.get_attribute("data-policy-version")
    assert f"policy v{version}" in card.find_element(By.CLASS_NAME, "answer-meta").text

    def thumbs(kind):  # the feedback service's counter, all tenants (process-wide: other
        # tests' services in this process add to it too)
        return sum(
            sample.value
            for family in REGISTRY.collect()
            for sample in family.samples
            if sample.name == "rlhf_feedback_thumbs_total"
            and sample.labels.get("policy_version") == version
            and sample.labels.get("thumb") == kind
        )

    up_before, down_before = thumbs("up"), thumbs("down")
    card.find_element(By.CLASS_NAME, "thumb-up").click()
    _wait(browser, lambda d: "stored" in card.find_element(By.CLASS_NAME, "feedback-status").text)
    [event] = _feedback_for(broker, generation_id)
    assert event.feedback.thumb == events_pb2.THUMB_UP and event.tenant == TENANT
    assert event.event_id == card.get_attribute("data-feedback-event")
    assert event.policy_version == int(version)

    # The panel: the served policy, and the thumb just given in the trend.
    _wait(browser, lambda d: f"v{version}" in d.find_element(By.ID, "panel-policy").text)
    # The panel redraws its trend as it refreshes: find the row afresh on every look.
    row_css = f"#trend li[data-version='{version}']"

    def trend_row(d):
        try:
            [row] = d.find_elements(By.CSS_SELECTOR, row_css)
            return row.get_attribute("data-thumbs"), row.text
        except (ValueError, StaleElementReferenceException):
            return None

    # The trend shows the feedback service's counts, this thumb included.
    rated = up_before + down_before + 1
    _, row_text = _wait(
        browser, lambda d: (r := trend_row(d)) is not None and int(r[0]) == rated and r
    )
    assert f"{(up_before + 1) / rated:.0%} of {rated:.0f}" in row_text
    assert "trainer" in browser.find_element(By.ID, "panel-missing").text

    # Two answers, the second ranked better; then a correction of the first.
    _ask(browser, "And about the mountains?", two=True)
    cards = _wait(browser, lambda d: _finished_answers(d, 3))[-2:]
    first, second = (c.get_attribute("data-generation-id") for c in cards)
    assert first != second
    cards[1].find_element(By.CLASS_NAME, "better").click()
    _wait(
        browser, lambda d: "stored" in cards[1].find_element(By.CLASS_NAME, "feedback-status").text
    )
    [ranking] = _feedback_for(broker, second)
    assert list(ranking.feedback.ranking.generation_ids) == [second, first]
    cards[0].find_element(By.CLASS_NAME, "correct").click()
    area = _wait(browser, lambda d: cards[0].find_element(By.CSS_SELECTOR, ".correction textarea"))
    area.clear()
    area.send_keys("Mountains are tall <b>and</b> old.")
    cards[0].find_element(By.CLASS_NAME, "send-correction").click()
    _wait(
        browser, lambda d: "stored" in cards[0].find_element(By.CLASS_NAME, "feedback-status").text
    )
    [correction] = _feedback_for(broker, first)
    assert correction.feedback.correction.text == "Mountains are tall <b>and</b> old."


def test_the_panel_shows_the_trainer_phase_as_text(platform, browser):
    """The panel's renderer, called in the browser with a trainer status (no trainer runs in
    this test): the phase shows when set and hides when empty; strings stay text."""
    browser.get(platform)
    _wait(
        browser,
        lambda d: (
            d.find_element(By.ID, "sign-in-form").is_displayed()
            or d.find_element(By.ID, "ask-form").is_displayed()
        ),
    )
    if browser.find_element(By.ID, "sign-in-form").is_displayed():
        browser.find_element(By.ID, "api-key").send_keys(API_KEY)
        browser.find_element(By.ID, "sign-in").click()
    _wait(browser, lambda d: d.find_element(By.ID, "ask-form").is_displayed())
    status = {
        "policy": {"version": 3, "model": "<i>tiny</i>", "backend": "local"},
        "trainer": {
            "step": 7,
            "policyVersion": 3,
            "paused": False,
            "phase": "training",
            "phaseDetail": "<img src=x onerror=alert(1)>",
        },
        "rewardModel": {"rewardVersion": 2, "step": 4},
        "versions": [
            {"version": 2, "thumbs": 10, "up": 4, "upRate": 0.4},
            {"version": 3, "thumbs": 5, "up": 4, "upRate": 0.8},
        ],
        "feedback": {"total": 15, "perMinute": 2.5},
        "missing": [],
    }
    # The page's own refresher would redraw the panel from the real (trainer-less) status:
    # its requests never answer from here on.
    browser.execute_script("window.fetch = () => new Promise(() => {})")
    browser.execute_script("window.rlhfPlayground.renderStatus(arguments[0])", status)
    phase = browser.find_element(By.ID, "panel-phase")
    assert phase.is_displayed() and phase.text == "training — <img src=x onerror=alert(1)>"
    assert browser.find_elements(By.CSS_SELECTOR, "#panel img, #panel i") == []
    assert browser.find_element(By.ID, "panel-policy").text == "v3 · <i>tiny</i>"
    assert browser.find_element(By.ID, "panel-reward").text == "v2 · 4 training rounds"
    rates = [li.text.split("\n")[-1] for li in browser.find_elements(By.CSS_SELECTOR, "#trend li")]
    assert rates == ["40% of 10", "80% of 5"]
    status["trainer"]["phase"] = ""
    browser.execute_script("window.rlhfPlayground.renderStatus(arguments[0])", status)
    assert not browser.find_element(By.ID, "panel-phase").is_displayed()


def test_the_server_refuses_what_a_page_of_its_own_would_not_send(platform):
    page = requests.get(platform, timeout=10)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "n": 1}
    assert requests.post(f"{platform}/api/chat", json=chat, timeout=10).status_code == 401
    assert requests.get(f"{platform}/api/status", timeout=10).status_code == 401
    signed = requests.post(f"{platform}/api/session", json={"apiKey": API_KEY}, timeout=10)
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = {"rlhf_playground": signed.cookies["rlhf_playground"]}
    evil = {"Origin": "http://evil.example"}
    cross = requests.post(
        f"{platform}/api/chat", json=chat, cookies=session, headers=evil, timeout=10
    )
    assert cross.status_code == 403
    form = requests.post(f"{platform}/api/feedback", data="thumb=1", cookies=session, timeout=10)
    assert form.status_code == 415  # a cross-site form cannot send JSON
    too_many = {**chat, "n": 3}
    assert (
        requests.post(
            f"{platform}/api/chat", json=too_many, cookies=session, timeout=10
        ).status_code
        == 400
    )
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    assert (
        requests.post(f"{platform}/api/chat", json=big, cookies=session, timeout=10).status_code
        == 413
    )
    ok = requests.post(f"{platform}/api/chat", json=chat, cookies=session, timeout=60)
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")
    requests.delete(f"{platform}/api/session", cookies=session, timeout=10)
    assert requests.get(f"{platform}/api/status", cookies=session, timeout=10).status_code == 401
