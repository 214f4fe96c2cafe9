"""Lecture mode: a reveal.js deck of each lecture notebook, with its outputs, that presents with no network.

`jupyter nbconvert --to slides` writes decks that load reveal.js, require.js, jQuery and MathJax
from CDNs at presentation time. `build_decks` writes the same decks (nbconvert's SlidesExporter,
the cells' `slideshow` metadata; 16:9 slides, long code lines wrapped for a projector), but first
puts those libraries next to them in `vendor/`: each is fetched once with npm (the npm registry's
own client), checked against its sha1 and cached in `cache_dir()/npm`, so later builds need no
network either. Without npm and without that cache the decks fall back to nbconvert's CDN
addresses, and the build says so.

The decks show a run of each notebook (its figures, tables and printed numbers) from the execution
cache of the profile (course_lib.executed, the cache `make book` uses), prepared by `deck_notebook`:
- a code cell tagged `setup` (imports, profile and device, loading) is left out of the deck; a slide
  break it carried moves to the next cell shown;
- cells whose slide type is "notes" become the speaker notes (`s` in the deck) of their subslide,
  and each section's notes end with the measured run time of that section's cells in the run;
- a subslide taller than the slide is split: its cells are measured (`cell_height`, calibrated
  in Chromium by tests/test_browser.py) and a new subslide starts where the next cell would not fit.

    python -m course_lib.slides [--out slides] [--profile P] [--unexecuted] [--cdn] NOTEBOOK ...
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import re
import shutil
import subprocess
import tarfile
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nbformat
from nbconvert import SlidesExporter
from traitlets.config import Config

from . import executed
from .runtime import cache_dir, log


@dataclass(frozen=True)
class VendoredLibrary:
    """An npm package a deck (or the course site) loads, and the setting that points it there
    (a SlidesExporter setting here; course_lib.book's MathJax: Sphinx's mathjax_path)."""

    package: str
    version: str
    sha1: str  # the registry's dist.shasum of the tarball
    setting: str
    entry: str  # path inside the package the setting points to ("" = the package folder)
    skip: tuple[str, ...] = ()  # paths inside the package the decks never load


# The versions nbconvert's reveal template is written for (its CDN defaults), except jQuery,
# whose 2.0.3 is not on npm; the template only uses `$` for scrolling slides.
LIBRARIES = (
    VendoredLibrary("reveal.js", "4.0.2", "2e5e9f8ed0fa239924b448f21d4238c5aa6e852e",
                    "reveal_url_prefix", ""),
    VendoredLibrary("requirejs", "2.1.10", "1e1d7f608790e532a422c6199dad2abe15484b54",
                    "require_js_url", "require.js"),
    VendoredLibrary("jquery", "3.7.1", "083ef98927c9a6a74d05a6af02806566d16274de",
                    "jquery_url", "dist/jquery.min.js"),
    # 60 MB unpacked; the decks use the CommonHTML output with the TeX fonts, about 20 MB of it.
    VendoredLibrary("mathjax", "2.7.7", "22ff89550a7b1f5f06a037d13da5ff3c33e11ec4",
                    "mathjax_url", "MathJax.js?config=TeX-AMS_CHTML-full,Safe",
                    skip=("unpacked/", "jax/output/SVG/", "fonts/HTML-CSS/Asana-Math/",
                          "fonts/HTML-CSS/Gyre-Pagella/", "fonts/HTML-CSS/Gyre-Termes/",
                          "fonts/HTML-CSS/Latin-Modern/", "fonts/HTML-CSS/Neo-Euler/",
                          "fonts/HTML-CSS/STIX-Web/")),
)
VENDOR_DIR = "vendor"
# 16:9 like most projectors, and wide enough for the ~100-character code lines of the notebooks
# (nbconvert's default is 960 x 700); reveal.js scales the slide to the screen.
SLIDE_SIZE = (1280, 720)
# Longer code lines wrap instead of running off the slide's right edge.
# Taller figures are scaled down to this height, keeping their proportions.
IMAGE_MAX_HEIGHT_PX = 600
DECK_CSS = ("<style>.reveal pre { white-space: pre-wrap; overflow-wrap: anywhere; }\n"
            f".reveal .jp-OutputArea-output img {{ max-height: {IMAGE_MAX_HEIGHT_PX}px; max-width: 100%; "
            "width: auto; height: auto; }</style>")
# Cells with this tag show only their outputs (the Jupyter Book convention; the site honours it too).
OUTPUT_ONLY_TAG = "remove-input"


class OfflineLibrariesUnavailable(RuntimeError):
    """A library the decks load can be neither found in the cache nor fetched with npm."""


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def npm_tarball(library: VendoredLibrary) -> Path:
    """The library's npm tarball from the cache, else `npm pack` it there once (sha1-checked)."""
    cached = cache_dir() / "npm" / f"{library.package}-{library.version}.tgz"
    if cached.is_file() and _sha1(cached) == library.sha1:
        return cached
    npm = shutil.which("npm")
    if npm is None:
        raise OfflineLibrariesUnavailable(
            f"{library.package}@{library.version} is not in {cached.parent} and npm is not installed")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        result = subprocess.run([npm, "pack", f"{library.package}@{library.version}",
                                 "--pack-destination", tmp, "--silent"], capture_output=True, text=True)
        packed = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(packed) != 1 or _sha1(packed[0]) != library.sha1:
            raise OfflineLibrariesUnavailable(
                f"npm pack {library.package}@{library.version} failed or gave an unexpected file:\n"
                f"{result.stderr.strip()[-600:]}")
        packed[0].replace(cached)
    return cached


def unpack_library(library: VendoredLibrary, vendor: Path) -> Path:
    """Unpack the library's tarball into vendor/<package>/ (once per version); return that folder."""
    target = vendor / library.package
    stamp = target / ".vendored"
    if stamp.is_file() and stamp.read_text() == library.version:
        return target
    tarball = npm_tarball(library)
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        members = []
        for member in archive.getmembers():
            inner = member.name.split("/", 1)[1] if "/" in member.name else ""
            if (member.isfile() or member.isdir()) and inner and not inner.startswith(library.skip):
                member.name = inner
                members.append(member)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
        archive.extractall(target, members=members, **safe)
    stamp.write_text(library.version)
    return target


def offline_settings(out_dir: Path) -> dict[str, str]:
    """SlidesExporter settings that point decks in out_dir at libraries vendored beside them."""
    settings = {"reveal_theme": "white"}  # its fonts ship with reveal.js; nbconvert's "simple" uses Google's
    for library in LIBRARIES:
        unpack_library(library, out_dir / VENDOR_DIR)
        url = f"{VENDOR_DIR}/{library.package}"
        settings[library.setting] = f"{url}/{library.entry}" if library.entry else url
    return settings


SETUP_TAG = "setup"
BREAKS = ("slide", "subslide")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def slide_type(cell) -> str:
    return cell.metadata.get("slideshow", {}).get("slide_type", "-")


def _set_slide_type(cell, kind: str) -> None:
    cell.metadata.setdefault("slideshow", {})["slide_type"] = kind


def _shown(cell) -> bool:
    return slide_type(cell) not in {"skip", "notes"}


def skip_setup_cells(nb) -> None:
    """Cells tagged `setup` become "skip"; a slide break one carried moves to the next cell shown."""
    cells = nb.cells
    for index, cell in enumerate(cells):
        if SETUP_TAG not in cell.metadata.get("tags", []):
            continue
        kind = slide_type(cell)
        _set_slide_type(cell, "skip")
        if kind in BREAKS:
            after = next((c for c in cells[index + 1:] if _shown(c) and SETUP_TAG not in c.metadata.get("tags", [])), None)
            if after is not None and (slide_type(after) not in BREAKS or kind == "slide"):
                _set_slide_type(after, kind)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{max(seconds, 1):.0f} s"


def sections(nb) -> list[list[int]]:
    """Cell indices per section (a slide and its subslides): a section starts at each shown "slide"
    cell, with the skipped cells right before it (set-up for what follows); cells before the first
    shown cell belong to the first section."""
    groups: list[list[int]] = [[]]
    started = False
    for index, cell in enumerate(nb.cells):
        if _shown(cell) and (slide_type(cell) == "slide" or not started):
            if started:
                moved: list[int] = []
                while slide_type(nb.cells[groups[-1][-1]]) == "skip":
                    moved.insert(0, groups[-1].pop())
                groups.append(moved)
            started = True
        groups[-1].append(index)
    return groups


def speaker_notes(nb, cell_seconds: Sequence[float] = (), run_note: str = "") -> None:
    """Merge each subslide's "notes" cells into one (reveal.js shows a subslide's first notes only),
    placed after the subslide's first cell; the first subslide of each section gets, at the end of
    its notes, the run time of the section's code cells (`cell_seconds`, one per code cell)."""
    code_index = {i: n for n, i in enumerate(i for i, c in enumerate(nb.cells) if c.cell_type == "code")}
    cells = []
    for section in sections(nb):
        seconds = sum(cell_seconds[code_index[i]] for i in section if i in code_index and code_index[i] < len(cell_seconds))
        has_code = any(i in code_index for i in section)
        subslides: list[list] = []
        for i in section:
            cell = nb.cells[i]
            if not subslides or (_shown(cell) and slide_type(cell) in BREAKS and any(_shown(c) for c in subslides[-1])):
                subslides.append([])
            subslides[-1].append(cell)
        for number, subslide in enumerate(subslides):
            notes = [c.source.strip() for c in subslide if slide_type(c) == "notes" and c.source.strip()]
            if number == 0 and has_code and len(cell_seconds):
                notes.append(f"⏱ This section's cells ran in **{_duration(seconds)}**{run_note}.")
            rest = [c for c in subslide if slide_type(c) != "notes"]
            if notes:
                merged = nbformat.v4.new_markdown_cell("\n\n".join(notes))
                _set_slide_type(merged, "notes")
                first_shown = next((k for k, c in enumerate(rest) if _shown(c)), len(rest) - 1)
                rest.insert(first_shown + 1, merged)
            cells.extend(rest)
    nb.cells = cells


# Rendered heights on a 1280 x 720 deck slide (reveal.js "white" theme, nbconvert's lab template),
# measured in Chromium on the course's decks (tests/test_browser.py checks every subslide): px per
# line of prose, code and output text, characters per line before a line wraps, and the fixed
# parts: a heading, a table row, a cell's and an output's padding.
PROSE_LINE_PX, CODE_LINE_PX, OUTPUT_LINE_PX, TABLE_LINE_PX = 26, 22, 26, 30
PROSE_CHARS, CODE_CHARS, OUTPUT_CHARS, TABLE_CHARS = 80, 100, 100, 81
TITLE_PX, HEADING_PX, TABLE_ROW_PX, PARAGRAPH_GAP_PX = 110, 70, 10, 8
MARKDOWN_CELL_PX, CODE_CELL_PX, OUTPUT_PX, IMAGE_OUTPUT_PX = 14, 50, 20, 40
CONTENT_WIDTH_PX = 1090  # wider images are scaled down to this width
SLIDE_BUDGET_PX = SLIDE_SIZE[1] - 130  # less the subslide's own padding and the estimate's error (up to ~130 px measured)


def _wrapped(lines: Sequence[str], chars: int) -> int:
    return sum(max(1, -(-len(line) // chars)) for line in lines)


def _table_height(rows: Sequence[str]) -> int:
    """A Markdown table's height: columns get widths in proportion to their longest cell (as a
    browser lays them out), and each row is as tall as its most-wrapped cell."""
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows
             if not set(row.strip()) <= set("|-: ")]
    if not cells:
        return 0
    widths = [max((len(row[j]) for row in cells if j < len(row)), default=1) or 1 for j in range(max(map(len, cells)))]
    chars = [max(4, TABLE_CHARS * w / sum(widths)) for w in widths]
    return sum(max(-(-len(c) // int(chars[j])) for j, c in enumerate(row)) * TABLE_LINE_PX + TABLE_ROW_PX
               for row in cells)


def _text_height(text: str) -> int:
    """Markdown prose (a cell or a Markdown output): headings, tables, and paragraphs and list
    items re-flowed into wrapped lines."""
    height, block, table = 0, "", []
    for line in text.split("\n") + [""]:
        stripped = line.strip()
        if table and not stripped.startswith("|"):
            height, table = height + _table_height(table), []
        starts_block = not stripped or stripped.startswith(("#", "|", "- ", "* ", "$$", ">")) or \
            re.match(r"\d+\. ", stripped)
        if starts_block and block:
            height += _wrapped([block], PROSE_CHARS) * PROSE_LINE_PX
            block = ""
        if not stripped:
            height += PARAGRAPH_GAP_PX
        elif stripped.startswith("# "):
            height += TITLE_PX
        elif stripped.startswith("#"):
            height += HEADING_PX
        elif stripped.startswith("|"):
            table.append(stripped)
        else:
            block = f"{block} {stripped}".strip()
    return height


def _png_size(data: str) -> tuple[int, int]:
    raw = base64.b64decode(data[:64])
    return struct.unpack(">II", raw[16:24])


def output_height(output) -> int:
    """The estimated height of one output on a slide."""
    data = output.get("data", {})
    if "image/png" in data:
        width, height = _png_size(data["image/png"])
        return min(height * min(1.0, CONTENT_WIDTH_PX / width), IMAGE_MAX_HEIGHT_PX) + IMAGE_OUTPUT_PX
    if "text/markdown" in data:
        return _text_height(data["text/markdown"]) + OUTPUT_PX
    text = output.get("text") or data.get("text/plain", "") or "\n".join(output.get("traceback", []))
    return _wrapped(text.rstrip("\n").split("\n"), OUTPUT_CHARS) * OUTPUT_LINE_PX + OUTPUT_PX


def cell_height(cell) -> int:
    """The estimated height of a cell on a slide: its input (prose or code) and its outputs."""
    if cell.cell_type == "markdown":
        return _text_height(cell.source) + MARKDOWN_CELL_PX
    output_only = OUTPUT_ONLY_TAG in cell.metadata.get("tags", [])
    source = cell.source.split("\n") if cell.source and not output_only else []
    return (CODE_CELL_PX + (_wrapped(source, CODE_CHARS) * CODE_LINE_PX if source else 0)
            + sum(output_height(o) for o in cell.get("outputs", [])))


def _output_parts(cell) -> list:
    """A code cell too tall for a slide as parts that fit: its input alone, then its outputs packed
    into as few output-only copies (tagged `remove-input`, each opening a subslide) as fit."""
    parts, chunk, used = [], [], 0
    for output in cell.outputs:
        height = output_height(output)
        if chunk and used + height > SLIDE_BUDGET_PX - CODE_CELL_PX:
            parts.append(chunk)
            chunk, used = [], 0
        chunk.append(output)
        used += height
    parts.append(chunk)
    copies = []
    for number, outputs in enumerate(parts):
        part = copy.deepcopy(cell)
        part.outputs = outputs
        part.metadata["tags"] = [*(t for t in part.metadata.get("tags", []) if t != OUTPUT_ONLY_TAG), OUTPUT_ONLY_TAG]
        _set_slide_type(part, "subslide")
        if "id" in part:
            part.id = f"{cell.id}-out{number}"
        copies.append(part)
    cell.outputs = []
    return [cell, *copies] if cell.source.strip() else copies


def fit_subslides(nb) -> None:
    """Split subslides taller than a slide: a new subslide starts at the cell that would not fit,
    and a code cell whose input and outputs together do not fit shows its outputs on subslides of
    their own (the input then stands alone)."""
    cells, used = [], 0
    for cell in nb.cells:
        if not _shown(cell):
            cells.append(cell)
            continue
        too_tall = cell.cell_type == "code" and cell.outputs and cell_height(cell) > SLIDE_BUDGET_PX
        for part in _output_parts(cell) if too_tall else [cell]:
            height = cell_height(part)
            if slide_type(part) in BREAKS or used == 0:
                used = height
            elif used + height > SLIDE_BUDGET_PX:
                _set_slide_type(part, "subslide")
                used = height
            else:
                used += height
            cells.append(part)
    nb.cells = cells


def deck_notebook(nb, cell_seconds: Sequence[float] = (), run_note: str = ""):
    """The notebook as its deck shows it (the input is not changed): no live widgets (no kernel
    behind a deck) and no stderr, setup cells left out, speaker notes merged with the sections'
    run times, subslides split to fit the slide."""
    deck = copy.deepcopy(nb)
    deck.metadata.pop("widgets", None)
    for cell in deck.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})
                            and o.get("name") != "stderr"]  # warnings and progress bars
    skip_setup_cells(deck)
    speaker_notes(deck, cell_seconds, run_note)
    fit_subslides(deck)
    return deck


def build_deck(notebook, out_dir: Path, settings: dict[str, str] | None = None, name: str | None = None) -> Path:
    """nbconvert's reveal.js deck of one notebook (a path, or a notebook node with `name`),
    written to out_dir/<name>.slides.html."""
    width, height = SLIDE_SIZE
    exporter = SlidesExporter(config=Config({
        "SlidesExporter": {"reveal_width": str(width), "reveal_height": str(height), **(settings or {})},
        "TagRemovePreprocessor": {"enabled": True, "remove_input_tags": [OUTPUT_ONLY_TAG]}}))
    if isinstance(notebook, (str, Path)):
        html, _ = exporter.from_filename(str(notebook))
        name = name or Path(notebook).stem
    else:
        if name is None:
            raise ValueError("name is needed to build a deck of a notebook node (e.g. '01_quantization_math')")
        html, _ = exporter.from_notebook_node(notebook)
    html = html.replace("</head>", DECK_CSS + "\n</head>", 1)
    deck = Path(out_dir) / f"{name}.slides.html"
    deck.write_text(html, encoding="utf-8")
    return deck


def build_decks(notebooks: Sequence[Path], out_dir: Path, offline: bool = True, profile: str | None = None,
                outputs: bool = True) -> list[Path]:
    """A deck per notebook in out_dir, with its libraries vendored when offline (else from CDNs).
    With outputs, each deck shows the notebook's run in `profile` from the execution cache
    (executing the notebooks it lacks); without, the notebooks as committed."""
    if not notebooks:
        raise ValueError("notebooks must name at least one .ipynb file, got none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {}
    if offline:
        try:
            settings = offline_settings(out_dir)
            log(f"the decks load their libraries from {out_dir / VENDOR_DIR}: no network needed")
        except OfflineLibrariesUnavailable as error:
            log(f"{error}.\nThe decks load reveal.js and MathJax from CDNs: they need the internet "
                 "while presenting. Install Node.js (npm) and run `make slides` again for offline decks.")
    if not outputs:
        return [build_deck(deck_notebook(nbformat.read(path, as_version=4)), out_dir, settings, Path(path).stem)
                for path in notebooks]
    decks = []
    for path, run in zip(notebooks, executed.executed(notebooks, profile)):
        note = f" ({run.profile} profile, run of {run.date[:10]})"
        decks.append(build_deck(deck_notebook(run.nb, run.cell_seconds, note), out_dir, settings, Path(path).stem))
    return decks


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.slides", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("slides"))
    parser.add_argument("--profile", default=None, help="the run shown: ci | laptop | gpu (default: "
                        "COURSE_PROFILE, else gpu with CUDA, else laptop)")
    parser.add_argument("--unexecuted", action="store_true", help="the notebooks as committed, no outputs")
    parser.add_argument("--cdn", action="store_true", help="load the libraries from CDNs (no vendor/)")
    args = parser.parse_args(argv)
    for deck in build_decks(args.notebooks, args.out, offline=not args.cdn, profile=args.profile,
                            outputs=not args.unexecuted):
        print(deck)


if __name__ == "__main__":
    main()
