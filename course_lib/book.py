"""The executed course site: `make book`.

Every lecture notebook, executed in one profile, as a static website with chapter navigation,
full-text search, and each chapter's exercise notebook linked at its end (the exercise pages are
shown unexecuted). Built with Sphinx and MyST-NB, what Jupyter Book 1 is made of, with its theme
(sphinx-book-theme); its configuration and landing page are in book/.

The runs come from the profile's execution cache (course_lib.executed: jupyter-cache, one per
profile, a notebook re-run only when its code changed). The builder stages each run with its
outputs in book/_build/<profile>/src (plus an "Exercises" section), vendors MathJax beside the
pages (an npm tarball, sha1-checked and cached, as the decks' libraries are: course_lib.slides),
and writes the site to book/_build/<profile>/html. Opening it sends no request off the machine.

    python -m course_lib.book [--profile P]      # what `make book` runs (COURSE_PROFILE, else laptop/gpu)
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Sequence

import nbformat

from . import executed
from .runtime import log
from .slides import OfflineLibrariesUnavailable, VendoredLibrary, unpack_library

BOOK_DIR = Path("book")
# MathJax 3 bundles its fonts (MathJax 4, Sphinx's default, loads them from a CDN); es5/ is all of it.
MATHJAX = VendoredLibrary("mathjax", "3.2.2", "c754d7b46a679d7f3fa03543d6b8bf124ddf9f6b",
                          "mathjax_path", "es5/tex-mml-chtml.js")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def lecture_notebooks(root: Path = Path(".")) -> list[Path]:
    return sorted((Path(root) / "notebooks").glob("*.ipynb"))


def site_dir(profile: str, root: Path = Path(".")) -> Path:
    return Path(root) / executed.BUILD_DIR / profile / "html"


def exercise_section(exercise: Path) -> nbformat.NotebookNode:
    """The Markdown cell that ends a chapter's page: a link to its exercise notebook."""
    title = exercise.stem.replace("_", " ")
    return nbformat.v4.new_markdown_cell(
        "## Exercises\n\n"
        f"Practise this chapter in its exercise notebook, [{title}](../exercises/{exercise.name}) "
        f"(`exercises/{exercise.name}` in the course): run each exercise cell, then the check cell "
        "after it; `course_lib.checks` says *passed* or shows the first values that differ.")


def page_notebook(nb: nbformat.NotebookNode, exercise: Path | None) -> nbformat.NotebookNode:
    """A run as its page shows it: live widgets (the explorer, progress bars) left out, since a
    static page has no kernel to drive them, and the exercise link appended."""
    page = copy.deepcopy(nb)
    page.metadata.pop("widgets", None)
    for cell in page.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
    if exercise is not None:
        page.cells.append(exercise_section(exercise))
    return page


def _write_if_changed(path: Path, text: str) -> None:
    """Keep unchanged pages' timestamps, so Sphinx re-reads only the pages that changed."""
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def stage(runs: Sequence[executed.ExecutedNotebook], lectures: Sequence[Path], src: Path,
          root: Path = Path(".")) -> None:
    """The site's sources in src/: the landing page, each run as a page, the exercise notebooks."""
    root = Path(root)
    _write_if_changed(src / "index.md", (root / BOOK_DIR / "index.md").read_text(encoding="utf-8"))
    for run, lecture in zip(runs, lectures):
        exercise = root / "exercises" / lecture.name
        page = page_notebook(run.nb, exercise if exercise.exists() else None)
        _write_if_changed(src / "notebooks" / lecture.name, nbformat.writes(page) + "\n")
    exercises = sorted((root / "exercises").glob("*.ipynb"))
    for exercise in exercises:
        _write_if_changed(src / "exercises" / exercise.name, exercise.read_text(encoding="utf-8"))
    current = {f"notebooks/{p.name}" for p in lectures} | {f"exercises/{p.name}" for p in exercises}
    for staged in [*src.glob("notebooks/*.ipynb"), *src.glob("exercises/*.ipynb")]:
        if f"{staged.parent.name}/{staged.name}" not in current:
            staged.unlink()  # a notebook since renamed or removed: no page for it


def build(profile: str | None = None, root: Path = Path(".")) -> Path:
    """Execute what the profile's cache lacks, stage the runs and build the site; its index.html."""
    from sphinx.application import Sphinx

    root = Path(root)
    profile = executed.resolve_profile(profile)
    lectures = lecture_notebooks(root)
    if not lectures:
        raise FileNotFoundError(f"no lecture notebooks in {root / 'notebooks'}: run `make book` in the course's folder")
    runs = executed.executed(lectures, profile, root)
    base = root / executed.BUILD_DIR / profile
    stage(runs, lectures, base / "src", root)
    dates = sorted(run.date[:10] for run in runs)
    period = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    settings = {"html_title": f"Small LLMs ({profile} profile)",
                "myst_substitutions": {"profile": profile, "executed": f"runs of {period}"}}
    try:
        unpack_library(MATHJAX, base / "static")
        settings.update(html_static_path=[str((base / "static").resolve())],
                        mathjax_path=f"{MATHJAX.package}/{MATHJAX.entry}")
    except OfflineLibrariesUnavailable as error:
        log(f"{error}.\nThe site loads MathJax from a CDN: its formulas need the internet. Install "
             "Node.js (npm) and run `make book` again for a site that needs no network.")
    app = Sphinx(str(base / "src"), str(root / BOOK_DIR), str(site_dir(profile, root)), str(base / "doctrees"),
                 "html", status=sys.stdout, warning=sys.stderr, freshenv=False, confoverrides=settings)
    app.build()
    if app.statuscode:
        raise RuntimeError(f"sphinx-build failed (status {app.statuscode}); see the messages above")
    index = site_dir(profile, root) / "index.html"
    log(f"the site ({profile} profile): {index}\n  open it in a browser, or serve it: "
         f"python -m http.server -d {index.parent}")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.book", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=None, help="ci | laptop | gpu (default: COURSE_PROFILE, "
                        "else gpu with CUDA, else laptop)")
    args = parser.parse_args(argv)
    build(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
