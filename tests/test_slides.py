"""Lecture mode: every lecture notebook builds a reveal.js deck that a projector can show.

Each deck (built as `make slides` builds it, into a temporary folder) must have one <section> per
slide cell and one nested <section> per slide or subslide cell; no cell on a slide may be taller
than a slide, and figures must fit one. The deck's preparation (set-up cells left out, speaker
notes, each section's measured minutes) and the execution cache it reads are tested on small
fixture notebooks made here; the vendoring of the decks' libraries on a small tarball made here
(the real ones come from npm; tests/test_browser.py presents the lecture decks with them).
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import io
import re
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from course_lib import slides

ROOT = Path(__file__).resolve().parents[1]
LECTURES = sorted((ROOT / "notebooks").glob("*.ipynb"))
SLIDE_TYPES = {"slide", "subslide", "fragment", "-", "skip", "notes"}
# A deck's slide is 1280 x 720 px (course_lib.slides.SLIDE_SIZE); at its 19-20 px fonts about 30
# lines fit. tests/test_browser.py measures each rendered subslide as well.
MAX_CELL_LINES = 30
# figsize in inches; matplotlib's inline backend draws them at 72 dpi: 10 x 7 in is 720 x 504 px.
MAX_FIGURE_INCHES = (10, 7)
FIGSIZE = re.compile(r"figsize\s*=\s*\(\s*([\d.]+)\s*,\s*([\d.]+)\s*\)")


def slide_type(cell) -> str:
    return cell.metadata.get("slideshow", {}).get("slide_type", "-")


def expected_sections(nb) -> tuple[int, int]:
    """(slides, slides + subslides) as nbconvert builds them: the first shown cell opens a slide."""
    shown = [slide_type(c) for c in nb.cells if slide_type(c) not in {"skip", "notes"}]
    return 1 + shown[1:].count("slide"), 1 + sum(t in {"slide", "subslide"} for t in shown[1:])


class SectionCounter(HTMLParser):
    """Counts a deck's <section>s: depth 1 = slides, depth 2 = the vertical subslides in them."""

    def __init__(self):
        super().__init__()
        self.depth, self.slides, self.subslides = 0, 0, 0

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.depth += 1
            self.slides += self.depth == 1
            self.subslides += self.depth == 2

    def handle_endtag(self, tag):
        if tag == "section":
            self.depth -= 1


def lecture_ids(path: Path) -> str:
    return path.stem


@pytest.fixture(scope="module")
def deck_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slides")


def count_sections(deck: Path) -> tuple[int, int]:
    counter = SectionCounter()
    counter.feed(deck.read_text(encoding="utf-8"))
    assert counter.depth == 0, f"{deck.name}: unbalanced <section> tags"
    return counter.slides, counter.subslides


@pytest.mark.parametrize("notebook", LECTURES, ids=lecture_ids)
def test_deck_has_a_section_per_slide_cell(notebook, deck_dir):
    nb = nbformat.read(notebook, as_version=4)
    assert count_sections(slides.build_deck(notebook, deck_dir)) == expected_sections(nb), (
        f"{notebook.name}: (slides, subslides) in the deck vs. the cells' slide metadata")
    shown = slides.deck_notebook(nb)
    deck = slides.build_deck(shown, deck_dir, name=notebook.stem + "-prepared")
    assert count_sections(deck) == expected_sections(shown), (
        f"{notebook.name}: the prepared deck's (slides, subslides) vs. its cells' slide metadata")


@pytest.mark.parametrize("notebook", LECTURES, ids=lecture_ids)
def test_every_cell_has_slide_metadata(notebook):
    nb = nbformat.read(notebook, as_version=4)
    missing = [i for i, c in enumerate(nb.cells) if c.metadata.get("slideshow", {}).get("slide_type") not in SLIDE_TYPES]
    assert not missing, f"{notebook.name}: cells {missing} lack metadata.slideshow.slide_type (one of {sorted(SLIDE_TYPES)})"
    assert slide_type(nb.cells[0]) == "slide", f"{notebook.name}: the title cell should open a slide"


@pytest.mark.parametrize("notebook", LECTURES, ids=lecture_ids)
def test_no_cell_is_taller_than_a_slide(notebook):
    nb = nbformat.read(notebook, as_version=4)
    tall = [(i, c.cell_type, len(c.source.splitlines())) for i, c in enumerate(nb.cells)
            if slide_type(c) not in {"skip", "notes"} and len(c.source.splitlines()) > MAX_CELL_LINES]
    assert not tall, f"{notebook.name}: (cell, type, lines) taller than {MAX_CELL_LINES} lines: {tall}"


@pytest.mark.parametrize("notebook", LECTURES, ids=lecture_ids)
def test_no_saved_widget_state(notebook):
    # Executing a notebook with nbclient saves its widgets' state in the metadata; a deck of such a
    # notebook loads the widget manager from unpkg.com, and the state is stale output anyway.
    nb = nbformat.read(notebook, as_version=4)
    assert "widgets" not in nb.metadata, (
        f"{notebook.name}: metadata.widgets holds saved widget state ({len(str(nb.metadata.widgets))} "
        "characters): delete it (notebooks are committed without outputs)")


def figure_sizes(source: str) -> list[tuple[float, float]]:
    return [(float(w), float(h)) for w, h in FIGSIZE.findall(source)]


@pytest.mark.parametrize("path", LECTURES + sorted((ROOT / "course_lib").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_figures_fit_a_projector(path):
    if path.suffix == ".ipynb":
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    else:
        source = path.read_text()
    too_big = [size for size in figure_sizes(source)
               if size[0] > MAX_FIGURE_INCHES[0] or size[1] > MAX_FIGURE_INCHES[1]]
    assert not too_big, f"{path.name}: figsize {too_big} exceeds {MAX_FIGURE_INCHES} inches"


def test_figure_size_pattern():
    assert figure_sizes("plt.subplots(1, 2, figsize=(8, 4))\nplt.figure(figsize = (10.5,3))") == [(8, 4), (10.5, 3)]


# ---- vendoring the decks' libraries (npm tarballs), on a tarball made here


def fake_library(tmp_path, monkeypatch) -> slides.VendoredLibrary:
    """A cached npm-style tarball (package/...) and its VendoredLibrary, in a temporary cache."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in {"package/dist/lib.js": "var lib;", "package/unpacked/big.js": "//"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text.encode()))
    data = buffer.getvalue()
    cached = tmp_path / "cache" / "npm" / "fakelib-1.0.0.tgz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    return slides.VendoredLibrary("fakelib", "1.0.0", hashlib.sha1(data).hexdigest(), "jquery_url",
                                  "dist/lib.js", skip=("unpacked/",))


def test_unpack_library_strips_the_package_folder_and_skips(tmp_path, monkeypatch):
    library = fake_library(tmp_path, monkeypatch)
    folder = slides.unpack_library(library, tmp_path / "vendor")
    assert (folder / "dist" / "lib.js").read_text() == "var lib;"
    assert not (folder / "unpacked").exists()


def test_a_corrupt_cached_tarball_without_npm_is_reported(tmp_path, monkeypatch):
    library = fake_library(tmp_path, monkeypatch)
    broken = dataclasses.replace(library, sha1="0" * 40)
    monkeypatch.setattr(slides.shutil, "which", lambda name: None)
    with pytest.raises(slides.OfflineLibrariesUnavailable, match="npm is not installed"):
        slides.npm_tarball(broken)


def test_build_decks_falls_back_to_cdns_without_the_libraries(tmp_path, monkeypatch, capsys):
    def unavailable(out_dir):
        raise slides.OfflineLibrariesUnavailable("no npm here")

    monkeypatch.setattr(slides, "offline_settings", unavailable)
    notebook = tmp_path / "talk.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Talk")])
    nb.cells[0].metadata["slideshow"] = {"slide_type": "slide"}
    nbformat.write(nb, notebook)
    [deck] = slides.build_decks([notebook], tmp_path / "out")
    assert "https://unpkg.com/reveal.js" in deck.read_text() and "need the internet" in capsys.readouterr().err


def test_build_decks_needs_notebooks(tmp_path):
    with pytest.raises(ValueError, match="notebooks"):
        slides.build_decks([], tmp_path)


# ---- the deck's preparation and the execution cache, on fixture notebooks


def fixture_notebook() -> nbformat.NotebookNode:
    """Two sections: a title with set-up code (tagged) and a code cell with notes; a second slide
    whose set-up cell carries the slide break, a notes cell and two code cells."""
    def cell(kind, source, slide_type, tags=()):
        new = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        new.metadata["slideshow"] = {"slide_type": slide_type}
        if tags:
            new.metadata["tags"] = list(tags)
        return new

    return nbformat.v4.new_notebook(cells=[
        cell("md", "# Talk", "slide"),
        cell("code", "import math", "subslide", ["setup"]),
        cell("code", "print(math.pi)", "-"),
        cell("md", "Say why pi.", "notes"),
        cell("md", "Pause for questions.", "notes"),
        cell("code", "x = 2", "slide", ["setup"]),
        cell("md", "## Second section", "-"),
        cell("md", "The numbers to expect: 4.", "notes"),
        cell("code", "print(x * 2)", "-"),
        cell("code", "print(x ** 3)", "subslide"),
    ])


def notes_in(deck: Path) -> list[str]:
    """The speaker notes of each subslide, as text (reveal.js shows a subslide's first aside.notes)."""
    html = deck.read_text(encoding="utf-8")
    return [re.sub(r"<[^>]+>", " ", aside) for aside in re.findall(r'<aside class="notes">(.*?)</aside>', html, re.S)]


def test_setup_cells_are_left_out_and_their_slide_break_moves_on():
    deck = slides.deck_notebook(fixture_notebook())
    kinds = [(slides.slide_type(c), c.source[:12]) for c in deck.cells]
    assert ("skip", "import math") in kinds and ("skip", "x = 2") in kinds
    assert ("slide", "## Second se") in kinds, "the set-up cell's slide break moved to the heading"
    assert ("subslide", "print(math.p") in kinds, "the first section's set-up cell's subslide break moved on"


def test_notes_are_merged_per_subslide_with_the_sections_minutes(tmp_path):
    nb = fixture_notebook()
    seconds = [5.0, 1.0, 30.0, 80.0, 10.0]  # one per code cell, in order
    deck_nb = slides.deck_notebook(nb, seconds, " (ci profile, run of 2026-12-01)")
    deck = slides.build_deck(deck_nb, tmp_path, name="talk")
    notes = notes_in(deck)
    # one notes element per subslide with notes: the title's (the section's minutes), the pi
    # subslide's (its two notes cells merged), the second section's (its notes and minutes)
    assert len(notes) == 3, notes
    title, pi, second = (re.sub(r"\s+", " ", note) for note in notes)
    assert "ran in 6 s" in title, title  # 5 s + 1 s
    assert "Say why pi." in pi and "Pause for questions." in pi and "ran in" not in pi
    assert "The numbers to expect: 4." in second
    assert "ran in 2.0 min" in second and "(ci profile, run of 2026-12-01)" in second, second  # 30 + 80 + 10 s
    assert count_sections(deck) == expected_sections(deck_nb) == (2, 4)
    assert nb.cells[1].metadata["slideshow"]["slide_type"] == "subslide", "the input notebook is unchanged"


def test_a_deck_without_run_times_gets_no_minutes(tmp_path):
    deck = slides.build_deck(slides.deck_notebook(fixture_notebook()), tmp_path, name="talk")
    assert not any("ran in" in note for note in notes_in(deck))


def test_runs_are_cached_per_profile_and_match_on_code_only(tmp_path):
    """A fixture notebook executed into a temporary execution cache (a real kernel, a second)."""
    from course_lib import executed

    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "talk.ipynb"
    nbformat.write(fixture_notebook(), path)
    assert executed.cached(path, "ci", tmp_path) is None
    run = executed.execute(path, "ci", tmp_path)
    outputs = [c.outputs for c in run.nb.cells if c.cell_type == "code"]
    assert outputs[1][0]["text"].startswith("3.14159") and outputs[3][0]["text"] == "4\n"
    assert len(run.cell_seconds) == 5 and all(s >= 0 for s in run.cell_seconds) and run.executed_by == "nbclient"
    assert executed.cached(path, "laptop", tmp_path) is None, "each profile has its own cache"
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source = "# Talk, retitled"  # prose only: the run still matches
    nbformat.write(nb, path)
    assert executed.cached(path, "ci", tmp_path) is not None
    nb.cells[2].source = "print(math.e)"  # code changed: no run of it yet
    nbformat.write(nb, path)
    assert executed.cached(path, "ci", tmp_path) is None


def test_a_run_with_missing_outputs_is_refused(tmp_path):
    from course_lib import executed

    with pytest.raises(ValueError, match="5 code cells but 1 outputs"):
        executed.store_run(fixture_notebook(), [[]], [1.0], "ci", "talk.ipynb", "nbval", tmp_path)


def png(width: int, height: int) -> str:
    """A PNG's base64 header with this size (all cell_height reads of it)."""
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return base64.b64encode(header + b"\x08\x06\x00\x00\x00").decode()


def test_tall_cells_are_split_over_subslides():
    figure = nbformat.v4.new_output("display_data", {"image/png": png(990, 500), "text/plain": "<Figure>"})
    code = nbformat.v4.new_code_cell("\n".join(f"line_{i} = {i}" for i in range(12)))
    code.outputs = [figure, copy.deepcopy(figure)]  # 12 lines of code and two 500-px figures
    prose = [nbformat.v4.new_markdown_cell("A paragraph. " * 20) for _ in range(6)]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("## Title"), code, *prose])
    for cell in nb.cells:
        cell.metadata["slideshow"] = {"slide_type": "-"}
    nb.cells[0].metadata["slideshow"]["slide_type"] = "slide"
    slides.fit_subslides(nb)
    kinds = [(slides.slide_type(c), c.cell_type, len(c.get("outputs", [])), slides.OUTPUT_ONLY_TAG in c.metadata.get("tags", []))
             for c in nb.cells]
    assert kinds[:4] == [("slide", "markdown", 0, False), ("-", "code", 0, False),
                         ("subslide", "code", 1, True), ("subslide", "code", 1, True)], kinds
    heights, used = [], 0
    for cell in nb.cells:
        used = slides.cell_height(cell) if slides.slide_type(cell) in slides.BREAKS else used + slides.cell_height(cell)
        heights.append(used)
    assert max(heights) <= slides.SLIDE_BUDGET_PX, heights
    assert sum(slides.slide_type(c) == "subslide" for c in nb.cells[4:]) >= 1, "six paragraphs do not fit one slide"


def test_markdown_tables_are_as_tall_as_their_wrapped_rows():
    short = "| a | b |\n|---|---|\n| 1 | 2 |"
    long = "| prompt | answer |\n|---|---|\n| " + "word " * 10 + " | " + "word " * 60 + " |"
    # the answer column gets most of the width (~69 of 81 characters): its 300 characters wrap 5 times
    row = slides.TABLE_LINE_PX + slides.TABLE_ROW_PX
    assert slides._text_height(short) == 2 * row + slides.PARAGRAPH_GAP_PX
    assert slides._text_height(long) == row + 5 * slides.TABLE_LINE_PX + slides.TABLE_ROW_PX + slides.PARAGRAPH_GAP_PX
