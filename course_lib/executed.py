"""The executed lecture notebooks: one execution cache per profile, for the site and the decks.

`make book` and `make slides` show the notebooks *with* their outputs. Both take them from a
jupyter-cache (the execution cache of Jupyter Book and MyST-NB) in `book/_build/<profile>/jupyter_cache`:
a notebook is executed only when no cached run matches its code (jupyter-cache hashes the code cells
and their metadata, not the prose), and each profile has its own cache, so outputs of a `ci` run never
appear in a `laptop` site. Each cached run records how long every code cell took (nbclient's
`record_timing`), which the decks turn into minutes per section.

nbval fills the same cache: the repository's conftest.py stores every lecture notebook that
`make test` ran green (`store_run`), so the site and the decks of the `ci` profile need no second run.

    python -m course_lib.executed [--profile P] NOTEBOOK ...   # execute what the cache lacks
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nbformat

from .runtime import log

BUILD_DIR = Path("book") / "_build"  # per profile: jupyter_cache/, the site's sources, doctrees and html/
CELL_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ExecutedNotebook:
    """A notebook with the outputs of a cached run, and that run's facts."""

    nb: nbformat.NotebookNode
    cell_seconds: tuple[float, ...]  # wall time of each code cell, in order
    profile: str
    executed_by: str  # "nbclient" (make book / make slides / course report) or "nbval" (make test)
    date: str

    @property
    def minutes(self) -> float:
        return sum(self.cell_seconds) / 60



def resolve_profile(name: str | None = None) -> str:
    """The profile name the notebooks would run in (COURSE_PROFILE, else gpu with CUDA, else laptop)."""
    from .runtime import profile

    return profile(name).name


def cache_path(profile: str, root: Path = Path(".")) -> Path:
    return Path(root) / BUILD_DIR / profile / "jupyter_cache"


def open_cache(profile: str, root: Path = Path(".")):
    from jupyter_cache import get_cache

    return get_cache(cache_path(profile, root))


def _timestamp(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def cell_seconds_from_metadata(nb: nbformat.NotebookNode) -> list[float]:
    """Each code cell's run time from nbclient's record_timing metadata (execute_input -> execute_reply)."""
    seconds = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        timing = cell.metadata.get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        seconds.append((_timestamp(end) - _timestamp(start)).total_seconds() if start and end else 0.0)
    return seconds


def store_run(source: nbformat.NotebookNode, outputs: Sequence[list], cell_seconds: Sequence[float],
              profile: str, uri: str, executed_by: str, root: Path = Path(".")) -> None:
    """Cache one green run of `source`: the outputs of each code cell, in order, and its run times.

    The cached notebook keeps the source's code cells and metadata exactly (so it matches the
    source's hash) with the run's outputs and execution counts 1, 2, ...; a run of the same code
    replaces an older one."""
    from jupyter_cache.base import CacheBundleIn

    code_cells = [cell for cell in source.cells if cell.cell_type == "code"]
    if not len(code_cells) == len(outputs) == len(cell_seconds):
        raise ValueError(f"{uri}: {len(code_cells)} code cells but {len(outputs)} outputs and "
                         f"{len(cell_seconds)} run times; expected one of each per code cell")
    nb = copy.deepcopy(source)
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            count += 1
            cell.outputs = [nbformat.from_dict(dict(output)) for output in outputs[count - 1]]
            cell.execution_count = count
            for output in cell.outputs:
                if output.output_type == "execute_result":
                    output.execution_count = count
    nbformat.validate(nb)
    data = {"profile": profile, "executed_by": executed_by, "cell_seconds": [round(s, 3) for s in cell_seconds],
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    with _writing(profile, root):
        cache = open_cache(profile, root)
        cache.cache_notebook_bundle(CacheBundleIn(nb, uri, data=data), overwrite=True)
        cache.match_cache_notebook(source)  # raises KeyError if the source would not find this run


@contextlib.contextmanager
def _writing(profile: str, root: Path):
    """One writer at a time: nbval's workers (`make test` runs two notebooks at once) each store
    their runs, and jupyter-cache's SQLite database must not be created or written by two at once."""
    folder = cache_path(profile, root).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "jupyter_cache.lock", "w") as lock:
        try:
            import fcntl
        except ImportError:  # Windows: no POSIX locks; run the notebooks one at a time there
            fcntl = None
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def cached(path: Path, profile: str, root: Path = Path(".")) -> ExecutedNotebook | None:
    """The notebook at `path` merged with its cached run in `profile`, or None when its code has none."""
    source = nbformat.read(path, as_version=4)
    cache = open_cache(profile, root)
    try:
        pk, nb = cache.merge_match_into_notebook(source)
    except KeyError:
        return None
    data = cache.get_cache_record(pk).data or {}
    return ExecutedNotebook(nb, tuple(data.get("cell_seconds", ())), profile,
                            data.get("executed_by", "?"), data.get("date", "?"))


def execute(path: Path, profile: str, root: Path = Path("."), timeout: int = CELL_TIMEOUT_S) -> ExecutedNotebook:
    """Run the notebook at `path` in its folder with COURSE_PROFILE=profile (checks strict: a failed
    check fails the run) and cache the run; a failing cell raises nbclient's CellExecutionError."""
    from nbclient import NotebookClient

    source = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(source)
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)

    def progress(cell, cell_index, **_):
        if cell.cell_type == "code":
            done = sum(c.cell_type == "code" for c in nb.cells[:cell_index + 1])
            print(f"\r  {path.name}: cell {done}/{code_cells}", end="", file=sys.stderr, flush=True)

    env = dict(os.environ, COURSE_PROFILE=profile, COURSE_CHECKS_STRICT="1")
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                       on_cell_start=progress, resources={"metadata": {"path": str(Path(path).parent)}}
                       ).execute(env=env)
    finally:
        print(file=sys.stderr)
    seconds = cell_seconds_from_metadata(nb)
    outputs = [cell.outputs for cell in nb.cells if cell.cell_type == "code"]
    store_run(source, outputs, seconds, profile, str(path), "nbclient", root)
    log(f"{path} ran in {(time.perf_counter() - start) / 60:.1f} min ({profile} profile); cached")
    return cached(path, profile, root)


def executed(paths: Sequence[Path], profile: str | None = None, root: Path = Path(".")) -> list[ExecutedNotebook]:
    """Each notebook with the outputs of its cached run in `profile`, executing those the cache lacks."""
    if not paths:
        raise ValueError("paths must name at least one .ipynb file, got none")
    profile = resolve_profile(profile)
    runs = []
    for path in map(Path, paths):
        run = cached(path, profile, root)
        if run is None:
            log(f"executing {path} in the {profile} profile (no cached run of its code)")
            run = execute(path, profile, root)
        runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.executed", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--profile", default=None, help="ci | laptop | gpu (default: COURSE_PROFILE, "
                        "else gpu with CUDA, else laptop)")
    args = parser.parse_args(argv)
    for run in executed(args.notebooks, args.profile):
        print(f"{run.profile}: {run.minutes:.1f} min of cells, run by {run.executed_by} on {run.date}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
