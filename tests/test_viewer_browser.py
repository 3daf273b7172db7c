"""The viewer page in a real headless Chromium (Debian packages chromium + chromium-driver,
installed by scripts/system-deps.sh): the tree, opening nodes, search, the timeline, a
5,000-event run, and a screenshot. The page is loaded from file://; it must make no request at all.

The browser and its driver are found on PATH, under the names distributions give them."""

from __future__ import annotations

import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from big_run import NEEDLE, write_big_run
from helpers import make, repl
from rlm.viewer import write_html

RECORDING = Path(__file__).parent / "data" / "recorded_run.jsonl"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1280,1000"]


def on_path(names: tuple[str, ...]) -> str | None:
    return next((found for found in map(shutil.which, names) if found), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, chromedriver = on_path(BROWSERS), on_path(DRIVERS)
    assert chromium and chromedriver, (
        f"the viewer tests need Chromium and its driver on PATH (one of {', '.join(BROWSERS)}, and chromedriver): "
        "scripts/system-deps.sh installs them")
    with tempfile.TemporaryDirectory(prefix="rlm-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium  # with the driver's path given, selenium downloads nothing
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(browser: WebDriver, page: Path) -> None:
    browser.get(page.resolve().as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def heads(browser: WebDriver, selector: str) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, f"{selector} > .head")


def click(browser: WebDriver, element: WebElement) -> None:
    """A real click, after scrolling the element clear of the sticky search bar."""
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def open_node(browser: WebDriver, head: WebElement) -> WebElement:
    """Click a node's head; return the node's now visible body."""
    click(browser, head)
    body = head.find_element(By.XPATH, "following-sibling::div[contains(@class, 'body')]")
    assert body.is_displayed()
    return body


def assert_clean(browser: WebDriver) -> None:
    """No script errors, and the page fetched nothing (everything is inline)."""
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_tree_opens_node_by_node_and_a_screenshot_is_taken(browser: WebDriver, tmp_path: Path) -> None:
    open_page(browser, write_html(RECORDING, tmp_path / "run.html"))
    assert browser.find_element(By.ID, "status").text == "answered"
    assert "line 27 holds the secret number 4711" in browser.find_element(By.ID, "summary").text
    stats = browser.find_elements(By.CSS_SELECTOR, "#totals .stat")
    assert len(stats) >= 9 and "sub-calls" in browser.find_element(By.ID, "totals").text
    turns = heads(browser, "#tree .node.kind-turn")
    assert [t.find_element(By.CLASS_NAME, "name").text for t in turns] == ["Turn 1", "Turn 2", "Turn 3", "Turn 4"]
    assert browser.find_elements(By.CSS_SELECTOR, "#tree .node.kind-cell") == []  # drawn only when opened

    batch_turn = open_node(browser, turns[1])
    assert "reply from recorded-root" in batch_turn.text and "llm_query_batched" in batch_turn.text
    cell = open_node(browser, heads(browser, "#tree .node.kind-cell")[0])
    subs = cell.find_elements(By.CSS_SELECTOR, ":scope > .children > .node.kind-sub")
    assert len(subs) == 4 and "4 sub-call(s)" in heads(browser, "#tree .node.kind-cell")[0].text
    assert "llm_query_batched 1/4" in subs[0].text and "tok" in subs[0].text and "ms" in subs[0].text
    sub = open_node(browser, heads(browser, "#tree .node.kind-sub")[2])
    assert "prompt (" in sub.text and "the secret number is 4711" in sub.text

    children_turn = open_node(browser, heads(browser, "#tree .node.kind-turn")[2])
    child_cell = open_node(browser, children_turn.find_element(By.CSS_SELECTOR, ".node.kind-cell > .head"))
    children = child_cell.find_elements(By.CSS_SELECTOR, ":scope > .children > .node.kind-run")
    assert len(children) == 2 and all("depth 1" in child.text for child in children)
    child = open_node(browser, children[0].find_element(By.CLASS_NAME, "head"))
    assert "Turn 1" in child.text and "Turn 2" in child.text

    label = "//div[@class='label'][starts-with(., 'system prompt')]"
    system = browser.find_element(By.XPATH, f"{label}/following-sibling::pre")
    preview_length = len(system.text)
    click(browser, system.find_element(By.XPATH, "following-sibling::button"))
    assert len(system.text) > preview_length + 1000  # "show all" gives the whole text

    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", turns[1])
    browser.execute_script("window.scrollBy(0, -90)")  # below the sticky search bar
    for name in ("viewer-tree.png", "viewer.png"):  # the opened tree, then the top of the page
        shot = tmp_path / name
        assert browser.save_screenshot(str(shot))
        width, height = png_size(shot)
        assert (width, height) == (1280, browser.execute_script("return window.innerHeight"))
        assert shot.stat().st_size > 30_000
        browser.execute_script("window.scrollTo(0, 0)")
    assert_clean(browser)


def test_search_lists_matches_and_reveals_them(browser: WebDriver, tmp_path: Path) -> None:
    open_page(browser, write_html(RECORDING, tmp_path / "run.html"))
    box = browser.find_element(By.ID, "search")
    box.send_keys("4711")
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "search-count").text)
    count = int(browser.find_element(By.ID, "search-count").text.split()[0])
    results = browser.find_elements(By.CSS_SELECTOR, "#search-results li")
    assert count == len(results) >= 5
    target = next(r for r in results if "sub-call" in r.text)
    assert target.text.startswith("run › turn 2 › cell 2 › sub-call")
    click(browser, target)
    hit = browser.find_element(By.CSS_SELECTOR, ".node.hit")
    assert hit.get_attribute("data-id") == target.get_attribute("data-target") and hit.is_displayed()
    assert [m.text for m in hit.find_elements(By.TAG_NAME, "mark")][:1] == ["4711"]
    box.clear()
    box.send_keys("no such text anywhere")
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "search-count").text.startswith("0"))
    assert browser.find_elements(By.CSS_SELECTOR, "#search-results li") == []
    assert_clean(browser)


def test_the_timeline_shows_where_time_went_and_links_to_turns(browser: WebDriver, tmp_path: Path) -> None:
    open_page(browser, write_html(RECORDING, tmp_path / "run.html"))
    legend = browser.find_element(By.CSS_SELECTOR, "#breakdown .legend").text
    for part in ("root model", "code", "waiting on sub-calls", "other"):
        assert part in legend
    names = [lane.text for lane in browser.find_elements(By.CSS_SELECTOR, "#timeline .lane .lane-name")]
    assert [names[0], names[1], names[3]] == ["root model (4)", "code (3)", "child runs (2)"]
    assert names[2].startswith("sub-calls (")  # overlapping calls are drawn as one span
    span = browser.find_elements(By.CSS_SELECTOR, "#timeline .span.c-code")[1]
    browser.execute_script("arguments[0].click()", span)
    hit = browser.find_element(By.CSS_SELECTOR, ".node.hit")
    assert hit.get_attribute("data-id") == "r0.t2.c2" and hit.is_displayed()
    assert_clean(browser)


def test_a_5000_event_run_opens_fast_and_finds_the_last_call(browser: WebDriver, tmp_path: Path) -> None:
    trajectory = write_big_run(tmp_path / "big.jsonl")
    assert trajectory.read_text(encoding="utf-8").count("\n") > 4800
    started = time.monotonic()
    open_page(browser, write_html(trajectory, tmp_path / "big.html"))
    assert time.monotonic() - started < 8
    assert int(browser.execute_script("return document.body.dataset.readyMs")) < 3000
    assert browser.execute_script("return document.getElementsByTagName('*').length") < 500  # nothing drawn early
    box = browser.find_element(By.ID, "search")
    box.send_keys(NEEDLE[:12])
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "search-count").text.startswith("1 "))
    click(browser, browser.find_element(By.CSS_SELECTOR, "#search-results li"))
    hit = browser.find_element(By.CSS_SELECTOR, ".node.hit")
    assert hit.get_attribute("data-id") == "r0.t20.c20.s239" and NEEDLE in hit.text and hit.is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, ".node.kind-sub")) == 240  # pages drawn up to it, no more
    browser.save_screenshot(str(tmp_path / "big.png"))
    assert png_size(tmp_path / "big.png")[0] == 1280
    assert_clean(browser)


def test_a_run_without_an_answer_says_why_at_the_top(browser: WebDriver, tmp_path: Path) -> None:
    rlm, _, _ = make([repl("x = 1")] * 4, log_dir=str(tmp_path))
    assert rlm.completion(context="c", query="q") is None
    open_page(browser, write_html(rlm.tracer.path, tmp_path / "run.html"))
    assert browser.find_element(By.ID, "status").text == "no_progress"
    first = browser.find_element(By.CSS_SELECTOR, "#summary dt")  # the first line of the header
    assert first.text == "stopped"
    stopped = browser.find_element(By.CSS_SELECTOR, "#summary dd.failure")
    assert "no progress in 3 replies in a row" in stopped.text
    assert_clean(browser)
