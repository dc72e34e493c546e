"""Drives the HTML tree viewer in headless Chromium: expand, filter, screenshot.

Needs the Debian packages `chromium` and `chromium-driver`; skipped with a
reason where they (or selenium) are absent. Selenium is given the driver and
browser paths, so selenium-manager never downloads anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from alphareason import viz

pytestmark = pytest.mark.browser

DATA = Path(__file__).parent / "data"
SMALL = DATA / "tree_small.json"
PUCT = DATA / "tree_puct.json"

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]


def _chromium() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _chromium(), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        missing = " and ".join(name for name, path in [("chromium", chromium),
                                                       ("chromedriver", chromedriver)] if path is None)
        pytest.skip(f"headless browser test needs {missing}: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # belt and braces: selenium-manager must not fetch
        browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    browser.set_page_load_timeout(20)
    try:
        yield browser
    finally:
        browser.quit()


def _save_screenshot(browser, path: Path) -> None:
    assert browser.save_screenshot(str(path)), f"could not save {path}"
    artifacts = os.environ.get("ALPHAREASON_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)


def test_viewer_expands_nodes_filters_by_visits_and_renders(driver, tmp_path):
    from selenium.webdriver.common.by import By

    page = viz.write_html([SMALL, PUCT], tmp_path / "trees.html")
    driver.get(page.as_uri())
    assert driver.title == "2 search trees: 4 9 10 13 -> 24"
    panels = driver.find_elements(By.CSS_SELECTOR, "section.panel")
    assert [p.find_element(By.CSS_SELECTOR, "h2.tree-title").text for p in panels] == [
        "Gumbel MuZero, 16 simulations", "PUCT, 12 simulations"]
    gumbel = panels[0]

    def node(panel, node_id):
        return panel.find_element(By.CSS_SELECTOR, f'li.node[data-node-id="{node_id}"]')

    # The chosen path starts open down to the solved leaf; other branches are collapsed.
    solved = node(gumbel, 6)
    assert solved.is_displayed() and "solved" in solved.get_attribute("class")
    assert solved.find_element(By.CSS_SELECTOR, ".verdict").text == "solved"
    branch, leaf = node(gumbel, 4), node(gumbel, 10)
    assert branch.is_displayed() and not leaf.is_displayed()

    # Expand "4*4=16": its child "16-10=6" (1 visit, a dead end) appears.
    branch.find_element(By.CSS_SELECTOR, ":scope > details > summary").click()
    assert leaf.is_displayed()
    assert leaf.find_element(By.CSS_SELECTOR, ".step").text == "16-10=6"
    assert leaf.find_element(By.CSS_SELECTOR, ".visits").text == "1"
    assert leaf.find_element(By.CSS_SELECTOR, ".verdict").text == "dead end"
    assert branch.find_element(By.CSS_SELECTOR, ":scope > details > summary .visits").text == "2"
    root_children = gumbel.find_elements(By.CSS_SELECTOR, "li.root > details > ul > li.node")
    assert [(c.find_element(By.CSS_SELECTOR, ".step").text,
             c.find_element(By.CSS_SELECTOR, ".visits").text) for c in root_children] == [
        ("13-9=4", "9"), ("10+13=23", "4"), ("9*4=36", "3"), ("9/4=2", "0")]

    # Collapse all, then expand all.
    driver.find_element(By.ID, "collapse-all").click()
    assert not solved.is_displayed() and not node(gumbel, 1).is_displayed()
    assert node(gumbel, 0).is_displayed()
    driver.find_element(By.ID, "show-chosen").click()
    assert solved.is_displayed() and branch.is_displayed() and not leaf.is_displayed()
    driver.find_element(By.ID, "expand-all").click()
    nodes = driver.find_elements(By.CSS_SELECTOR, "li.node")
    assert len(nodes) == 16 + 12 and all(n.is_displayed() for n in nodes)

    # Filter: nodes with fewer than 2 visits are hidden, the others stay visible.
    box = driver.find_element(By.ID, "min-visits")
    assert box.get_attribute("type") == "number"
    box.clear()
    box.send_keys("2")
    shown = {(n.get_attribute("id"), int(n.get_attribute("data-visits")), n.is_displayed())
             for n in nodes}
    hidden = {i for i, visits, displayed in shown if not displayed}
    assert {i for i, visits, _ in shown if visits < 2} == hidden
    assert {"t0-n9", "t0-n10", "t0-n5", "t0-n16", "t1-n8", "t1-u0_3"} <= hidden
    assert not {"t0-n0", "t0-n4", "t0-n8", "t1-n4", "t1-n5"} & hidden
    counts = [p.find_element(By.CSS_SELECTOR, ".shown-count").text for p in panels]
    assert counts == ["8", "7"]
    assert branch.find_element(By.CSS_SELECTOR, ".nkids").text == "1 child (1 hidden)"
    _save_screenshot(driver, tmp_path / "tree_viewer_min_visits_2.png")

    # Clearing the filter shows every node again.
    box.clear()
    box.send_keys("0")
    assert all(n.is_displayed() for n in nodes)
    assert branch.find_element(By.CSS_SELECTOR, ".nkids").text == "1 child"
    _save_screenshot(driver, tmp_path / "tree_viewer.png")
    print(f"screenshots in {tmp_path}")


def test_filter_starts_at_min_visits_and_notebook_frame_runs_the_viewer(driver, tmp_path, monkeypatch):
    """`viz.show(..., min_visits=2)` as Jupyter displays it: a sandboxed frame whose script runs."""
    from selenium.webdriver.common.by import By

    pytest.importorskip("IPython")
    monkeypatch.setattr(viz, "_in_ipython", lambda: True)
    shown = viz.show([SMALL, PUCT], min_visits=2, height=500)
    page = tmp_path / "notebook_output.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>notebook output</title></head>'
                    f'<body><p>Out[1]:</p>{shown.data}</body></html>', encoding="utf-8")
    driver.get(page.as_uri())
    frame = driver.find_element(By.CSS_SELECTOR, "div.alphareason-tree > iframe")
    assert 500 <= frame.size["height"] <= 504  # the requested height plus the border
    driver.switch_to.frame(frame)
    try:
        assert driver.find_element(By.ID, "min-visits").get_attribute("value") == "2"
        # The filter applied on load: the counts and hidden nodes match typing 2 into the box.
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".shown-count")] == ["8", "7"]
        driver.find_element(By.ID, "expand-all").click()
        nodes = driver.find_elements(By.CSS_SELECTOR, "li.node")
        hidden = {n.get_attribute("id") for n in nodes if not n.is_displayed()}
        assert hidden == {n.get_attribute("id") for n in nodes if int(n.get_attribute("data-visits")) < 2}
        assert driver.find_element(By.ID, "t0-n6").find_element(By.CSS_SELECTOR, ".step").text == "6*4=24"
    finally:
        driver.switch_to.default_content()
    _save_screenshot(driver, tmp_path / "tree_viewer_in_notebook_frame.png")
