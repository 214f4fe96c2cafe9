"""Run the whole course in one profile and write one report: wall time per notebook, its
"What we measured" table, and (on CUDA) the GPU tests and benchmarks.

    python benchmarks/course_report.py --profile gpu --out course-report   # a lecture machine's check
    python benchmarks/course_report.py --profile laptop --out /tmp/report  # timings for the README

Executed notebooks are saved beside the report (never over the committed ones). Each lecture
notebook that ran green is also
- recorded in benchmarks/timings.json (its minutes in this profile, the device, the date): the one
  source of the README's minutes and the notebooks' **Time.** lines (`make timings` writes those);
- stored in the profile's execution cache (course_lib.executed), so `make book` and `make slides`
  in this profile show this run without running the notebook again.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from course_lib import executed, timings

ROOT = Path(__file__).resolve().parents[1]


def last_markdown_output(nb) -> str:
    """The last Markdown display of a run: by the course's convention, its "What we measured" table."""
    for cell in reversed(nb.cells):
        for output in reversed(cell.get("outputs", [])):
            if "text/markdown" in output.get("data", {}):
                return output["data"]["text/markdown"]
    return "(no table)"


def run_notebook(path: Path, out_dir: Path, timeout: int, profile: str) -> tuple[bool, float, str]:
    source = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(source)
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        ok, note = True, last_markdown_output(nb)
    except CellExecutionError as error:
        ok, note = False, f"```\n{str(error)[-1500:]}\n```"
    seconds = time.perf_counter() - start
    nbformat.write(nb, out_dir / f"{path.parent.name}-{path.name}")
    if ok and path.parent.name == "notebooks":
        executed.store_run(source, [c.outputs for c in nb.cells if c.cell_type == "code"],
                           executed.cell_seconds_from_metadata(nb), profile,
                           str(path.relative_to(ROOT)), "nbclient (course report)", ROOT)
    return ok, seconds, note


def run_command(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="gpu" if torch.cuda.is_available() else "laptop",
                        choices=["ci", "laptop", "gpu"])
    parser.add_argument("--out", type=Path, default=Path("course-report"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--only", nargs="*", default=None, help="notebook numbers, e.g. 01 02")
    parser.add_argument("--solutions", action="store_true", help="also run solutions/")
    parser.add_argument("--quick", action="store_true", help="quick GPU checks (gpu_check.py --quick)")
    parser.add_argument("--no-timings", action="store_true",
                        help=f"do not record the lecture notebooks' minutes in {timings.TIMINGS_FILE}")
    parser.add_argument("--no-gpu-check", action="store_true",
                        help="skip benchmarks/gpu_check.py on CUDA (it calls this script for chapters 03-06)")
    args = parser.parse_args()
    os.environ["COURSE_PROFILE"] = args.profile
    os.environ["COURSE_CHECKS_STRICT"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    measured = timings.load(ROOT)
    today = time.strftime("%Y-%m-%d")
    lines = [f"# Course report: profile {args.profile}", "", f"device: {device}; torch {torch.__version__}", ""]
    failed = 0
    if torch.cuda.is_available() and not args.no_gpu_check:  # CUDA tests and GPU benchmarks: benchmarks/gpu_check.py
        code, seconds = run_command([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]
                                    + (["--quick"] if args.quick else []),
                                    args.out / "gpu-check.log")
        lines += [f"## GPU checks: {'ok' if code == 0 else 'FAILED'} in {seconds:.0f} s (gpu-check.log)",
                  "", "```", (args.out / "gpu-check.log").read_text()[-6000:], "```", ""]
        failed += code != 0
    folders = ["notebooks"] + (["solutions"] if args.solutions else [])
    rows = ["| notebook | result | minutes |", "|---|---|---|"]
    tables = []
    for folder in folders:
        for path in sorted((ROOT / folder).glob("*.ipynb")):
            if args.only and path.name[:2] not in args.only:
                continue
            print(f"running {folder}/{path.name} ...", flush=True)
            ok, seconds, note = run_notebook(path, args.out, args.timeout, args.profile)
            failed += not ok
            if ok and folder == "notebooks" and not args.no_timings:
                timings.record(measured, path.stem, args.profile, seconds / 60, device, today)
            rows.append(f"| {folder}/{path.name} | {'ok' if ok else 'FAILED'} | {seconds / 60:.1f} |")
            tables += [f"### {folder}/{path.name}", "", note, ""]
            print(f"  {'ok' if ok else 'FAILED'} in {seconds / 60:.1f} min", flush=True)
    lines += ["## Notebooks", ""] + rows + [""] + tables
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {args.out / 'report.md'}")
    if not args.no_timings:
        timings.save(measured, ROOT)
        print(f"minutes recorded in {timings.TIMINGS_FILE}: `make timings` writes them into the README "
              "and the notebooks' **Time.** lines")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
