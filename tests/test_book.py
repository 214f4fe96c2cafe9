"""The executed course site (`make book`) in headless Chromium, with every non-local request blocked.

Builds the site in the ci profile (from the execution cache: in `make test` nbval's runs fill it, so
nothing runs twice; run alone, the notebooks the cache lacks are executed first), serves it on
localhost and checks every chapter page: it renders, every figure of the run is an image that loaded,
every "What we measured"-style Markdown table is a table, the page links its exercise notebook, and
no request left the machine. Then the navigation, the full-text search and MathJax. Screenshots go
to test-artifacts/book_*.png. Those tests are marked `executed`; the staging of the site's sources
is tested on fixture notebooks made here.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from browsing import ARTIFACTS, open_local, serve

ROOT = Path(__file__).resolve().parents[1]
LECTURES = sorted((ROOT / "notebooks").glob("*.ipynb"))
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")


@pytest.fixture(scope="module")
def site():
    """The ci site, built as `make book` builds it, served on localhost: (base URL, staged sources)."""
    from course_lib import book, executed

    index = book.build("ci", ROOT)
    with serve(index.parent) as base:
        yield {"base": base, "src": ROOT / executed.BUILD_DIR / "ci" / "src"}


def open_page(context, base: str, path: str):
    return open_local(context, base, path, wait_until="networkidle")


def image_outputs(nb) -> int:
    return sum(any(t in output.get("data", {}) for t in IMAGE_TYPES)
               for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs)


def markdown_tables(nb) -> int:
    """Pipe tables in the run's Markdown outputs (the chapters' "What we measured" tables)."""
    return sum(len(re.findall(r"^\|[-:| ]+\|\s*$", output["data"]["text/markdown"], re.M))
               for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
               if "text/markdown" in output.get("data", {}))


PAGE_JS = """() => {
    const article = document.querySelector('article.bd-article');
    const images = [...article.querySelectorAll('img')];
    return {title: document.querySelector('h1') ? document.querySelector('h1').textContent : '',
            images: images.length,
            loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
            outputTables: article.querySelectorAll('.cell_output table').length,
            exercise: [...article.querySelectorAll('a')].map(a => a.getAttribute('href'))
                .filter(h => h && h.includes('exercises/')),
            text: article.innerText.length};
}"""


@pytest.mark.executed
@pytest.mark.parametrize("notebook", LECTURES, ids=lambda path: path.stem)
def test_chapter_page_shows_the_run(notebook, site, browser_context):
    staged = nbformat.read(site["src"] / "notebooks" / notebook.name, as_version=4)
    page, blocked = open_page(browser_context, site["base"], f"notebooks/{notebook.stem}.html")
    state = page.evaluate(PAGE_JS)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"book_{notebook.stem}.png", full_page=True)
    page.close()
    title = nbformat.read(notebook, as_version=4).cells[0].source.split("\n")[0].lstrip("# ").strip()
    plain = state["title"].translate(str.maketrans("‘’“”", "''\"\""))  # Sphinx typesets quotes
    assert title and title in plain, f"the page's heading {state['title']!r} is not the chapter's {title!r}"
    assert state["images"] == image_outputs(staged), (
        f"{notebook.name}: {image_outputs(staged)} figures in the run, {state['images']} images on the page")
    assert state["loaded"] == state["images"], f"{state['images'] - state['loaded']} images did not load"
    assert state["outputTables"] >= markdown_tables(staged), (
        f"{notebook.name}: {markdown_tables(staged)} Markdown tables in the run's outputs, "
        f"{state['outputTables']} tables in the page's outputs")
    assert f"../exercises/{notebook.stem}.html" in state["exercise"], state["exercise"]
    assert blocked == [], f"the page sent requests off the machine: {blocked}"


@pytest.mark.executed
def test_every_chapter_in_the_navigation(site, browser_context):
    page, blocked = open_page(browser_context, site["base"], "index.html")
    links = page.evaluate("() => [...document.querySelectorAll('nav.bd-links a')].map(a => a.getAttribute('href'))")
    page.screenshot(path=ARTIFACTS / "book_index.png")
    page.close()
    for notebook in LECTURES:
        assert f"notebooks/{notebook.stem}.html" in links, f"{notebook.stem} is not in the navigation: {links}"
        assert f"exercises/{notebook.stem}.html" in links
    assert blocked == [], blocked


@pytest.mark.executed
def test_full_text_search_finds_a_chapter(site, browser_context):
    page, blocked = open_page(browser_context, site["base"], "search.html?q=SmoothQuant")
    page.locator("#search-results ul.search li a").first.wait_for(timeout=30_000)
    hits = page.evaluate("() => [...document.querySelectorAll('#search-results ul.search li a')]"
                         ".map(a => a.getAttribute('href'))")
    page.close()
    assert any("02_int8_inference" in hit for hit in hits), hits
    assert blocked == [], blocked


@pytest.mark.executed
def test_formulas_are_typeset_offline(site, browser_context):
    with_math = next((nb for nb in LECTURES if re.search(r"\$[^$\n]+\$", "\n".join(
        c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "markdown"))), None)
    if with_math is None:
        pytest.skip("no chapter has a formula")
    page, blocked = open_page(browser_context, site["base"], f"notebooks/{with_math.stem}.html")
    page.locator("mjx-container").first.wait_for(timeout=30_000)
    page.close()
    assert blocked == [], blocked


# ---- the site's sources, on fixture notebooks


def test_a_page_leaves_out_live_widgets_and_links_its_exercises():
    from course_lib import book

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("interact(f)")])
    nb.metadata["widgets"] = {"state": {}}
    nb.cells[0].outputs = [
        nbformat.v4.new_output("display_data", {book.WIDGET_VIEW: {"model_id": "1"}, "text/plain": "VBox()"}),
        nbformat.v4.new_output("display_data", {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})]
    page = book.page_notebook(nb, Path("exercises/01_math.ipynb"))
    assert [list(o.data) for o in page.cells[0].outputs] == [["image/png", "text/plain"]]
    assert "widgets" not in page.metadata and len(nb.cells[0].outputs) == 2, "the run itself is unchanged"
    assert page.cells[-1].source.startswith("## Exercises") and "(../exercises/01_math.ipynb)" in page.cells[-1].source


def test_staging_writes_pages_and_drops_removed_ones(tmp_path):
    from course_lib import book, executed

    for folder in ("book", "notebooks", "exercises"):
        (tmp_path / folder).mkdir()
    (tmp_path / "book" / "index.md").write_text("# Course\n")
    lecture = tmp_path / "notebooks" / "01_math.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · Math")])
    nbformat.write(nb, lecture)
    nbformat.write(nb, tmp_path / "exercises" / "01_math.ipynb")
    src = tmp_path / "src"
    (src / "notebooks").mkdir(parents=True)
    (src / "notebooks" / "00_renamed.ipynb").write_text("{}")
    run = executed.ExecutedNotebook(nb, (), "ci", "nbval", "2026-12-01")
    book.stage([run], [lecture], src, tmp_path)
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*.*")) == [
        "exercises/01_math.ipynb", "index.md", "notebooks/01_math.ipynb"]
    page = nbformat.read(src / "notebooks" / "01_math.ipynb", as_version=4)
    assert "exercises/01_math.ipynb" in page.cells[-1].source
