"""Keeping the notebooks honest: exercises generated from solutions, outputs committed clean.

`exercises/NN_*.ipynb` is written from `solutions/NN_*.ipynb` by replacing every region between
`### BEGIN SOLUTION` and `### END SOLUTION` (the nbgrader convention) with a stub. Notebooks are
committed without outputs, except cells marked `# NBVAL_CHECK_OUTPUT`, whose output nbval compares.

    python -m course_lib.notebook_tools exercises [--check]   # write (or verify) exercises/
    python -m course_lib.notebook_tools outputs [--strip]     # find (or remove) stray outputs
    python -m course_lib.notebook_tools record NB.ipynb ...   # execute, keep only checked outputs
    python -m course_lib.notebook_tools timings [--check]     # README minutes and **Time.** lines
                                                              # from benchmarks/timings.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError")
CHECKED = "NBVAL_CHECK_OUTPUT"
NOTEBOOK_DIRS = ("notebooks", "solutions", "exercises")


class MarkerError(ValueError):
    """A solution notebook whose BEGIN/END SOLUTION markers do not pair up."""


def strip_solutions(source: str, where: str) -> str:
    """`source` with each BEGIN..END SOLUTION region replaced by the stub, at the marker's indent."""
    out, inside = [], False
    for number, line in enumerate(source.split("\n"), 1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if inside:
                raise MarkerError(f"{where}, line {number}: '{BEGIN}' inside an open solution region")
            inside = True
            indent = line[:len(line) - len(line.lstrip())]
            out.extend(indent + s for s in STUB)
        elif stripped.startswith(END):
            if not inside:
                raise MarkerError(f"{where}, line {number}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def exercise_from_solution(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The learner's notebook: solution regions stubbed, all outputs cleared."""
    exercise = copy.deepcopy(solution)
    for index, cell in enumerate(exercise.cells):
        if cell.cell_type != "code":
            if BEGIN in cell.source or END in cell.source:
                raise MarkerError(f"{name}, cell {index}: solution markers belong in code cells")
            continue
        cell.source = strip_solutions(cell.source, f"{name}, cell {index} (id {cell.get('id', '?')})")
        cell.outputs, cell.execution_count = [], None
    return exercise


def exercise_path(solution_path: Path, root: Path) -> Path:
    return root / "exercises" / solution_path.name


def write_exercises(root: Path = Path("."), check: bool = False) -> list[Path]:
    """Write exercises/ from solutions/ (or, with check, list the exercises that are stale)."""
    stale = []
    solutions = sorted((root / "solutions").glob("*.ipynb"))
    for path in solutions:
        text = nbformat.writes(exercise_from_solution(nbformat.read(path, as_version=4), str(path))) + "\n"
        target = exercise_path(path, root)
        if not target.exists() or target.read_text() != text:
            stale.append(target)
            if not check:
                target.parent.mkdir(exist_ok=True)
                target.write_text(text)
    expected = {exercise_path(p, root).name for p in solutions}
    orphans = [p for p in sorted((root / "exercises").glob("*.ipynb")) if p.name not in expected]
    return stale + orphans


def stray_outputs(path: Path) -> list[int]:
    """Indices of code cells that carry outputs or execution counts nbval does not check."""
    nb = nbformat.read(path, as_version=4)
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and CHECKED not in c.source
            and (c.outputs or c.execution_count is not None)]


def unrecorded_checks(path: Path) -> list[int]:
    """Indices of checked cells whose outputs lack an execution count: nbval fails them ("Unrun
    reference cell has outputs"); `record` writes outputs and counts together."""
    nb = nbformat.read(path, as_version=4)
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and CHECKED in c.source
            and c.outputs and c.execution_count is None]


def strip_outputs(path: Path) -> bool:
    """Remove stray outputs, saved widget state and run timestamps in place (nbval needs the execution count of a checked
    cell with outputs, so those stay); True when the file changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    nb.metadata.pop("widgets", None)  # saved widget state: stale, large, and it makes decks load from a CDN
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code" and CHECKED not in cell.source:
            cell.outputs, cell.execution_count = [], None
    if nbformat.writes(nb) == before:
        return False
    path.write_text(nbformat.writes(nb) + "\n")
    return True


def record_checked_outputs(path: Path, timeout: int = 1800) -> None:
    """Execute `path` (in its folder) and save it with only the NBVAL_CHECK_OUTPUT cells' outputs,
    so that nbval has the expected outputs to compare with. Runs in the ci profile (what CI
    compares against) unless COURSE_PROFILE says otherwise."""
    from nbclient import NotebookClient

    os.environ.setdefault("COURSE_PROFILE", "ci")  # the kernel inherits it

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    path.write_text(nbformat.writes(nb) + "\n")
    strip_outputs(path)


def all_notebooks(root: Path = Path(".")) -> list[Path]:
    return [p for d in NOTEBOOK_DIRS for p in sorted((root / d).glob("*.ipynb"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.notebook_tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("exercises", help="write exercises/ from solutions/")
    ex.add_argument("--check", action="store_true", help="only report stale exercises")
    out = sub.add_parser("outputs", help="report notebook cells with stray outputs")
    out.add_argument("--strip", action="store_true", help="remove them")
    rec = sub.add_parser("record", help="execute notebooks, keeping only the checked outputs")
    rec.add_argument("paths", nargs="+", type=Path)
    tim = sub.add_parser("timings", help="write the README's minutes and the notebooks' **Time.** "
                         "lines from benchmarks/timings.json")
    tim.add_argument("--check", action="store_true", help="only report what disagrees with it")
    args = parser.parse_args(argv)
    if args.command == "timings":
        from . import timings

        try:
            stale = timings.write_timings(check=args.check)
        except timings.TimingsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.check and stale:
            print("timings disagree with benchmarks/timings.json: " + ", ".join(map(str, stale)) +
                  "\nrun `python -m course_lib.notebook_tools timings` and commit the result", file=sys.stderr)
            return 1
        print("timings agree with benchmarks/timings.json" if args.check else f"wrote timings into {len(stale)} file(s)")
        return 0
    if args.command == "record":
        for path in args.paths:
            record_checked_outputs(path)
            print(f"recorded {path}")
        return 0
    if args.command == "exercises":
        try:
            stale = write_exercises(check=args.check)
        except MarkerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.check and stale:
            print("exercises/ is stale: " + ", ".join(map(str, stale)) +
                  "\nrun `make exercises` (python -m course_lib.notebook_tools exercises) and commit it",
                  file=sys.stderr)
            return 1
        print("exercises/ is up to date" if args.check else f"wrote {len(stale)} exercise notebook(s)")
        return 0
    if args.strip:
        changed = [path for path in all_notebooks() if strip_outputs(path)]
        print(f"cleaned {len(changed)} notebook(s)")
        return 0
    problems = {p: stray_outputs(p) for p in all_notebooks()}
    problems = {p: cells for p, cells in problems.items() if cells}
    for path, cells in problems.items():
        print(f"{path}: code cells {cells} carry outputs; run `make clean-notebooks` "
              f"(only cells marked # {CHECKED} may keep theirs)", file=sys.stderr)
    unrecorded = {p: cells for p in all_notebooks() if (cells := unrecorded_checks(p))}
    for path, cells in unrecorded.items():
        print(f"{path}: checked cells {cells} have outputs but no execution count; run "
              f"`python -m course_lib.notebook_tools record {path}`", file=sys.stderr)
    return 1 if problems or unrecorded else 0


if __name__ == "__main__":
    sys.exit(main())
