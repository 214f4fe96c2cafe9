"""The course in a real browser: JupyterLab and a slides deck in headless Chromium, via Playwright.

Starts the course's JupyterLab on localhost (COURSE_PROFILE=ci), runs chapter 01, moves the
quantization explorer's slider and checks that its plot and its numbers change; then builds the
chapter's reveal.js deck, serves it on localhost with every other address blocked, and steps through
it; and checks that every subslide of every lecture deck, with the outputs of the notebook's ci run,
fits the slide's height (those run after nbval in `make test`, marked `executed`). Screenshots go to
test-artifacts/. Skipped, with the reason, where Chromium or playwright is
missing (`make browser` installs Debian's chromium), where chapter 01 has no slider, or where the
deck's libraries can be neither found in the cache nor fetched with npm.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from browsing import ARTIFACTS, open_local, serve  # the browser_context fixture is in conftest.py

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "notebooks" / "01_quantization_math.ipynb"
LECTURES = sorted((ROOT / "notebooks").glob("*.ipynb"))
# JupyterLab settings for the test's own, empty settings folder: every cell in the page (no
# windowing), no autosave, no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
}
RUN_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer {url} in {timeout_s} s:\n{log.read_text()[-3000:]}")


def chapter_has_slider() -> bool:
    if not CHAPTER.exists():
        return False
    cells = nbformat.read(CHAPTER, as_version=4).cells
    source = "\n".join(cell.source for cell in cells if cell.cell_type == "code")
    return re.search(r"\b(Int|Float|SelectionSlider|FloatLog)?Slider\b|\binteract(ive)?\b", source) is not None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The course's JupyterLab on a free localhost port, serving a copy of chapter 01; stopped after."""
    if not chapter_has_slider():
        pytest.skip(f"{CHAPTER.name} is missing or has no ipywidgets slider yet")
    home = tmp_path_factory.mktemp("lab")
    (home / "notebooks").mkdir()
    shutil.copy(CHAPTER, home / "notebooks" / CHAPTER.name)  # the kernel's outputs never touch the repo
    for name, values in LAB_SETTINGS.items():
        target = home / "settings" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, COURSE_PROFILE="ci", JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    log = home / "lab.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.open_browser=False",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={token}", "--ServerApp.allow_root=True",
             f"--ServerApp.root_dir={home}", "--LabApp.news_url=None"],
            cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/api/status?token={token}", process, log)
        yield {"base": base, "token": token, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# What the page's cells show: prompts ("[ ]:", "[*]:", "[3]:") and tracebacks.
CELL_STATE_JS = r"""() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
    const errors = [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
        .map(e => e.textContent).filter(t => /Traceback \(most recent call last\)/.test(t));
    return {prompts, errors};
}"""


def run_all_cells(page) -> None:
    """Run > Run All Cells, then wait until every code cell has an execution count (or one failed)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    deadline, state = time.monotonic() + RUN_TIMEOUT_S, {}
    while time.monotonic() < deadline:
        state = page.evaluate(CELL_STATE_JS)
        done = all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"])
        if done or state["errors"]:
            break
        time.sleep(0.5)
    assert not state["errors"], f"a cell of {CHAPTER.name} failed in JupyterLab:\n{state['errors'][0][-2000:]}"
    assert state["prompts"] and all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"]), (
        f"not every cell ran within {RUN_TIMEOUT_S} s: prompts {state['prompts']}")


# The explorer's plot (its images) and its numbers (its text, less the sliders and other controls).
EXPLORER_OUTPUT_JS = r"""(explorer) => {
    const images = [...explorer.querySelectorAll('.widget-output img')].map(image => image.src);
    const copy = explorer.cloneNode(true);
    copy.querySelectorAll('.widget-slider, .widget-dropdown, .widget-toggle-buttons, .widget-radio, img')
        .forEach(control => control.remove());
    return {image: images.join(' ') || null, text: copy.textContent.replace(/\s+/g, ' ').trim()};
}"""
# ipywidgets.interactive's box, or a box of sliders and an output built by hand
EXPLORER = ".widget-interact, .widget-vbox:has(.widget-slider):has(.widget-output)"


def explorer_state(explorer) -> dict:
    """The explorer's plot (a digest of its images, None without one) and its numbers (text)."""
    state = explorer.evaluate(EXPLORER_OUTPUT_JS)
    image = state["image"] and hashlib.sha1(state["image"].encode()).hexdigest()[:12]
    return {"image": image, "text": state["text"]}


def move_slider(explorer) -> tuple[str, str]:
    """Move the explorer's bits slider (else its first) one step by keyboard; (readout before, after)."""
    sliders = explorer.locator(".widget-slider")
    bits = sliders.filter(has=explorer.page.locator(".widget-label", has_text=re.compile("bit", re.I)))
    slider = bits.first if bits.count() else sliders.first
    readout = slider.locator(".widget-readout")
    before = readout.inner_text()
    handle = slider.locator(".noUi-handle")
    handle.focus()
    handle.press("ArrowLeft")
    if readout.inner_text() == before:  # already at its minimum
        handle.press("ArrowRight")
    return before, readout.inner_text()


def test_chapter01_explorer_reacts_in_jupyterlab(browser_context, lab):
    page = browser_context.new_page()
    page.goto(f"{lab['base']}/lab/tree/notebooks/{CHAPTER.name}?token={lab['token']}")
    # the status bar reads "Python 3 (ipykernel) | Idle" once the kernel is up (before: "No Kernel")
    page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\(ipykernel\) \| Idle")).wait_for(timeout=90_000)
    run_all_cells(page)

    explorer = page.locator(EXPLORER).first
    explorer.locator(".widget-output img").wait_for()
    explorer.scroll_into_view_if_needed()
    before = explorer_state(explorer)
    readout_before, readout_after = move_slider(explorer)
    assert readout_after != readout_before, "the slider's value did not change"
    deadline, after = time.monotonic() + 60, before
    while time.monotonic() < deadline:
        after = explorer_state(explorer)
        if after["image"] and after["image"] != before["image"] and after["text"] != before["text"]:
            break
        time.sleep(0.5)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "jupyterlab_chapter01_explorer.png")
    page.close()
    assert before["image"] and before["text"], f"the explorer showed no plot or numbers: {before['text']!r}"
    moved = f"when the slider went {readout_before} -> {readout_after}"
    assert after["image"] and after["image"] != before["image"], f"the plot did not change {moved}"
    assert after["text"] != before["text"], f"the numbers did not change {moved}: {after['text']!r}"


@pytest.fixture(scope="module")
def deck_site(tmp_path_factory):
    """Every lecture notebook's reveal.js deck with the outputs of its ci run (as `make slides`
    builds them, from the execution cache nbval filled), the libraries vendored beside them, on localhost."""
    from course_lib import slides

    out = tmp_path_factory.mktemp("slides")
    try:
        slides.offline_settings(out)
    except slides.OfflineLibrariesUnavailable as error:
        pytest.skip(f"the decks' libraries are not available offline: {error}")
    slides.build_decks(LECTURES, out, profile="ci")
    with serve(out) as base:
        yield base


def open_deck(context, site: str, notebook: Path):
    """A page showing the notebook's deck, every address but the local server's blocked; (page, blocked)."""
    page, blocked = open_local(context, site, f"{notebook.stem}.slides.html")
    page.locator(".reveal.ready .slides > section.present").wait_for()
    return page, blocked


# Where the deck is: its slide (h) and subslide (v), the fragments shown so far and those left on
# this subslide, and the subslide's height and heading.
DECK_STATE_JS = """() => {
    const slides = [...document.querySelectorAll('.reveal .slides > section')];
    const present = document.querySelector('.reveal .slides > section.present');
    const subslide = present.querySelector(':scope > section.present');
    const heading = subslide.querySelector('h1, h2, h3');
    return {index: slides.indexOf(present), count: slides.length,
            v: [...present.querySelectorAll(':scope > section')].indexOf(subslide),
            subslides: slides.map(slide => slide.querySelectorAll(':scope > section').length),
            shown: document.querySelectorAll('.reveal .fragment.visible').length,
            left: subslide.querySelectorAll('.fragment:not(.visible)').length,
            height: subslide.scrollHeight, heading: heading ? heading.textContent.replace('¶', '') : ''};
}"""


def press_right(page, state: dict) -> dict:
    """ArrowRight: reveal.js shows the slide's next fragment, else moves to the next slide."""
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"(s) => {{ const now = ({DECK_STATE_JS})(); "
                           "return now.index !== s.index || now.shown !== s.shown; }", arg=state, timeout=10_000)
    return page.evaluate(DECK_STATE_JS)


@pytest.mark.executed
def test_chapter01_deck_steps_through_offline(browser_context, deck_site):
    if not CHAPTER.exists():
        pytest.skip(f"{CHAPTER.name} is missing")
    page, blocked = open_deck(browser_context, deck_site, CHAPTER)
    state = page.evaluate(DECK_STATE_JS)
    assert state["index"] == 0 and state["count"] >= 2, state
    prose = "\n".join(c.source for c in nbformat.read(CHAPTER, as_version=4).cells if c.cell_type == "markdown")
    if re.search(r"\$[^$\n]+\$", prose):  # MathJax, served from vendor/, typesets the formulas
        page.locator(".MathJax_CHTML").first.wait_for()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "slides_chapter01_first.png")
    visited = [0]
    while state["index"] < state["count"] - 1 or state["left"]:
        new = press_right(page, state)
        assert new["index"] in (state["index"], state["index"] + 1), f"ArrowRight jumped: {state} -> {new}"
        if new["index"] != state["index"]:
            visited.append(new["index"])
        state = new
    assert visited == list(range(state["count"])), f"slides visited in order: {visited}"
    page.wait_for_timeout(1_000)  # let the slide transition finish before the picture
    page.screenshot(path=ARTIFACTS / "slides_chapter01_last.png")
    page.close()
    # nbconvert's template imports mermaid (for diagrams, which the course has none of) from a CDN
    assert [url for url in blocked if "mermaid" not in url] == [], "the deck needs the network"


@pytest.mark.executed
@pytest.mark.parametrize("notebook", LECTURES, ids=lambda path: path.stem)
def test_deck_subslides_fit_the_screen(notebook, browser_context, deck_site):
    """Every subslide, with all its fragments and the outputs of the run, fits the deck's slide height."""
    from course_lib.slides import SLIDE_SIZE

    page, _ = open_deck(browser_context, deck_site, notebook)
    too_tall = []
    for h, count in enumerate(page.evaluate(DECK_STATE_JS)["subslides"]):
        for v in range(count):
            page.evaluate(f"() => {{ location.hash = '#/{h}/{v}'; }}")
            page.wait_for_function(f"() => {{ const now = ({DECK_STATE_JS})(); "
                                   f"return now.index === {h} && now.v === {v}; }}")
            state = page.evaluate(DECK_STATE_JS)
            if state["height"] > SLIDE_SIZE[1]:
                too_tall.append(f"#/{h}/{v} {state['heading'][:40]!r}: {state['height']} px")
    page.close()
    assert not too_tall, (f"{notebook.name}: subslides taller than {SLIDE_SIZE[1]} px, cut off on a "
                          f"projector (split them with a 'subslide' cell): {too_tall}")
