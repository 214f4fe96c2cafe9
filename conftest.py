"""pytest configuration shared by the unit tests and nbval's notebook runs."""
from pathlib import Path

import pytest

LECTURES = Path(__file__).resolve().parent / "notebooks"


def pytest_collectstart(collector):
    # nbval: compare only stdout of # NBVAL_CHECK_OUTPUT cells; warnings and progress bars go to
    # stderr and differ from machine to machine (see ANCHORS.md).
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "application/javascript",
                                   "application/vnd.jupyter.widget-view+json")


def _is_lecture_cell(item) -> bool:
    path = getattr(item.parent, "path", None)
    return type(item).__name__ == "IPyNbCell" and path is not None and path.parent == LECTURES


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each lecture cell's nbval run: passed or not, its outputs and its wall time."""
    outcome = yield
    if call.when == "call" and _is_lecture_cell(item):
        runs = item.parent.__dict__.setdefault("course_runs", [])
        runs.append((outcome.get_result().passed, item.test_outputs or [], call.duration))


def pytest_runtest_teardown(item, nextitem):
    """After a lecture notebook's last cell: a green run (every cell passed) goes into the execution
    cache of the profile it ran in, so that `make book` and `make slides` need not run it again."""
    if not _is_lecture_cell(item) or (nextitem is not None and nextitem.parent is item.parent):
        return
    runs = item.parent.__dict__.get("course_runs", [])
    cells = [cell for cell in item.parent.nb.cells if cell.cell_type == "code"]
    if len(runs) != len(cells) or not all(passed for passed, _, _ in runs):
        return
    from course_lib import executed

    path = item.parent.path
    executed.store_run(item.parent.nb, [outputs for _, outputs, _ in runs], [s for _, _, s in runs],
                       executed.resolve_profile(), str(path.relative_to(LECTURES.parent)), "nbval",
                       root=LECTURES.parent)
