"""The GPU checks of chapters 01-02 in one go, for a machine with a CUDA GPU (a few minutes):

    python benchmarks/gpu_check.py [--quick]

1. the CUDA tests (`pytest -m cuda`: the padded INT8 matmul, Int8Linear in BF16, a quantized model);
2. the GEMM benchmark on the GPU (INT8 `_int_mm` vs FP32 vs BF16);
3. the end-to-end benchmark against BF16 (the teacher if it is cached or can be fetched, else its
   architecture with random weights: speed and memory only);
4. batched vs one-at-a-time generation (benchmarks/bench_generation.py);
5. chapters 03-06 executed in the `gpu` profile (`chapters_in_gpu_profile`).
Without a CUDA GPU it says so and exits 0, so it can sit in any script.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def teacher_is_available() -> bool:
    """True when the teacher is cached here (a device machine usually cannot fetch it)."""
    from course_lib.models import teacher_checkpoint_dir

    return (teacher_checkpoint_dir() / "course_manifest.json").is_file()


def step(title: str, command: list[str]) -> bool:
    print(f"\n=== {title}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    ok = subprocess.run(command, cwd=ROOT).returncode == 0
    print(f"=== {title}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
    return ok


def chapters_in_gpu_profile(budget_s: float = 300.0) -> bool:
    """Chapters 03-06 (none run on a GPU before) executed in the `gpu` profile, as course_report.py
    runs notebooks (nbclient; executed copies in gpu-check-notebooks/, each chapter's minutes and
    "What we measured" table printed). A chapter starts only while some of `budget_s` is left, each
    cell stops at what is left, so this step ends near its budget; the longest chapter, 04, runs last.
    Expected on one H200, an estimate from the CPU timings (not yet measured): 03 ≈ 1 min, 05 ≈ 1.5,
    06 ≈ 2, 04 ≈ 4: about 8.5 minutes for all four, so the default 5 minutes may stop before 04."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from course_report import run_notebook

    out = ROOT / "gpu-check-notebooks"
    out.mkdir(exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("COURSE_PROFILE", "COURSE_CHECKS_STRICT")}
    os.environ.update(COURSE_PROFILE="gpu", COURSE_CHECKS_STRICT="1")  # the kernels inherit them
    deadline, all_ok = time.perf_counter() + budget_s, True
    try:
        for number in ("03", "05", "06", "04"):
            path = next((ROOT / "notebooks").glob(f"{number}_*.ipynb"))
            left = deadline - time.perf_counter()
            if left < 30:
                print(f"=== {path.name} (gpu profile): not run, the step's {budget_s:.0f} s are spent", flush=True)
                all_ok = False
                continue
            ok, seconds, table = run_notebook(path, out, timeout=int(left))
            print(f"=== {path.name} (gpu profile): {'ok' if ok else 'FAILED'} in {seconds / 60:.1f} min\n{table}",
                  flush=True)
            all_ok &= ok
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return all_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes, no peak-memory runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (the CPU results come from the test suite and "
              "benchmarks/bench_end_to_end.py)")
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    python = sys.executable
    repeats = ["--repeats", "3" if args.quick else "5"]
    end_to_end = [python, "benchmarks/bench_end_to_end.py", *repeats, "--decode-steps", "16"]
    if args.quick:
        end_to_end.append("--no-memory")
    if not teacher_is_available():
        print("the teacher is not cached here: the end-to-end run uses random weights of its shape")
        end_to_end.append("--random-weights")
    results = [
        step("CUDA tests", [python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            "tests/test_quant.py", "tests/test_quant_int8.py"]),
        step("GEMM", [python, "benchmarks/bench_gemm.py", "--device", "cuda", *repeats] + (["--quick"] if args.quick else [])),
        step("end to end", end_to_end),
        step("generation", [python, "benchmarks/bench_generation.py"]),
        chapters_in_gpu_profile(),
    ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
