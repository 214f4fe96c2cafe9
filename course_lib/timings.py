"""One source for the chapters' run times: benchmarks/timings.json.

It holds, per lecture notebook and profile, the minutes one measured run took, on which device and
when (benchmarks/course_report.py records them from a run). From it `python -m course_lib.notebook_tools
timings` writes the README's minutes (every Markdown table with a "minutes: ci / laptop / gpu" column
or with ci, laptop and gpu columns, rows named by chapter number) and the **Time.** line at the top of
each lecture notebook; with --check (in `make test`) it only reports what disagrees.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import nbformat

from .runtime import PROFILES

TIMINGS_FILE = Path("benchmarks") / "timings.json"
MINUTES_HEADER = "minutes: " + " / ".join(PROFILES)
NOT_MEASURED = "–"
TIME_LINE = "**Time.**"
HEADER_CELLS = 3  # the **Time.** line sits in one of a notebook's first cells


class TimingsError(ValueError):
    """A notebook or README without the place its timings go, or a timings file that lacks them."""


def load(root: Path = Path(".")) -> dict:
    return json.loads((Path(root) / TIMINGS_FILE).read_text(encoding="utf-8"))


def save(data: dict, root: Path = Path(".")) -> None:
    """Write the timings file atomically (temporary file, then rename)."""
    path = Path(root) / TIMINGS_FILE
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        tmp.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp.name, path)


def record(data: dict, notebook: str, profile: str, minutes: float, device: str, date: str) -> None:
    """Set one measured run (minutes of `notebook`, a stem like 00_why_small_models, in `profile`)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if not minutes >= 0:
        raise ValueError(f"minutes must be a non-negative number, got {minutes!r}")
    entry = data.setdefault("notebooks", {}).setdefault(notebook, {})
    entry[profile] = {"minutes": round(float(minutes), 1), "device": device, "date": date}


def _minutes(entry: dict, profile: str) -> str:
    run = entry.get(profile)
    return f"{run['minutes']:.1f}" if run else NOT_MEASURED


def time_line(entry: dict) -> str:
    """The notebook's **Time.** line, e.g. "**Time.** ci 0.2 min, laptop 0.4 min, gpu not yet
    measured (measured runs; ci and laptop: 2-core CPU). The first run ever ..."."""
    parts = [f"{p} {_minutes(entry, p)} min" if entry.get(p) else f"{p} not yet measured" for p in PROFILES]
    devices: dict[str, list[str]] = {}
    for p in PROFILES:
        if entry.get(p):
            devices.setdefault(entry[p]["device"], []).append(p)
    where = "; ".join(f"{' and '.join(ps)}: {device}" for device, ps in devices.items())
    line = f"{TIME_LINE} {', '.join(parts)} (measured runs; {where})."
    note = entry.get("note", "").strip()
    return line + (f" {note[0].upper()}{note[1:]}." if note else "")


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def readme_with_timings(text: str, data: dict) -> str:
    """`text` with the minutes of every timings table written from `data`."""
    notebooks = data.get("notebooks", {})
    lines = text.split("\n")
    index = 0
    while index < len(lines) - 1:
        header, rule = lines[index], lines[index + 1]
        if not (header.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rule.strip())):
            index += 1
            continue
        names = _cells(header)
        columns = {i: name for i, name in enumerate(names) if name == MINUTES_HEADER or name in PROFILES}
        index += 2
        while index < len(lines) and lines[index].startswith("|"):
            cells = _cells(lines[index])
            number = re.match(r"(\d\d)\b", cells[0])
            stem = next((s for s in notebooks if number and s.startswith(number.group(1) + "_")), None)
            if columns and number and stem is None:
                raise TimingsError(f"README.md: table row {cells[0]!r} has no entry in {TIMINGS_FILE}")
            if columns and stem is not None and len(cells) == len(names):
                for column, name in columns.items():
                    cells[column] = (" / ".join(_minutes(notebooks[stem], p) for p in PROFILES)
                                     if name == MINUTES_HEADER else _minutes(notebooks[stem], name))
                lines[index] = "| " + " | ".join(cells) + " |"
            index += 1
    return "\n".join(lines)


def notebook_with_time_line(nb: nbformat.NotebookNode, line: str, name: str = "notebook") -> nbformat.NotebookNode:
    """`nb` with the paragraph that starts with **Time.** (in one of its first cells) set to `line`."""
    for cell in nb.cells[:HEADER_CELLS]:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        start = next((i for i, text in enumerate(lines) if text.startswith(TIME_LINE)), None)
        if start is None:
            continue
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
        cell.source = "\n".join(lines[:start] + [line] + lines[end:])
        return nb
    raise TimingsError(f"{name}: none of its first {HEADER_CELLS} cells has a line starting with "
                       f"{TIME_LINE}; add one (its text is written from {TIMINGS_FILE})")


def write_timings(root: Path = Path("."), check: bool = False) -> list[Path]:
    """Write the README's minutes and each lecture notebook's **Time.** line from the timings file
    (with check: only list the files that disagree with it)."""
    root = Path(root)
    data = load(root)
    stale = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        if path.stem not in data.get("notebooks", {}):
            raise TimingsError(f"{path}: no entry in {TIMINGS_FILE}; run benchmarks/course_report.py "
                               "for it, or add its measured minutes")
        text = path.read_text(encoding="utf-8")
        nb = nbformat.read(path, as_version=4)
        new = nbformat.writes(notebook_with_time_line(nb, time_line(data["notebooks"][path.stem]), str(path))) + "\n"
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = readme_with_timings(text, data)
    if new != text:
        stale.append(readme)
        if not check:
            readme.write_text(new, encoding="utf-8")
    return stale
