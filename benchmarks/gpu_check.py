"""Every GPU check of the course in one go, for a machine with a CUDA GPU (under 8 minutes on an H200):

    python benchmarks/gpu_check.py [--quick] [--only NAME ...]

Steps (each a subprocess; one failing does not stop the others):
1. cuda tests: `pytest -m cuda` (the padded INT8 matmul, INT8 layers in BF16, the decoder's CUDA
   graphs and quantized models on CUDA);
2. gemm: INT8 `_int_mm` vs BF16 vs FP32 at the teacher's shapes and 4096³ (target: INT8 >= 1.5x BF16);
3. crossover: Llama-shaped layers from width 576 to 4096, batch-1 decode of BF16 vs W8A16 vs W8A8,
   every one as CUDA graphs (`course_lib.crossover`): the width at which INT8 starts to win;
4. end to end: the teacher (or its shape with random weights when it is not cached) against BF16,
   the decode steps of every variant as CUDA graphs — and once more all compiled (torch.compile);
5. chapter 02 in the gpu profile (nbval, notebook and solution);
6. chapters 03-06 in the gpu profile (benchmarks/course_report.py: each one's minutes and "What we
   measured" table in gpu-check-notebooks/report.md; about 8 minutes more on an H200, an estimate from
   the CPU timings — run it alone with `--only chapters` when the device time is short).
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
PYTHON = sys.executable


def teacher_is_available() -> bool:
    """True when the teacher is cached here (a device machine usually cannot fetch it)."""
    from course_lib.models import teacher_checkpoint_dir

    return (teacher_checkpoint_dir() / "course_manifest.json").is_file()


def crossover_command(quick: bool) -> list[str]:
    code = ("import json; from course_lib.crossover import int8_crossover, crossover_width;"
            f"rows = int8_crossover(steps={16 if quick else 32}, repeats={3 if quick else 5});"
            "[print(json.dumps(r)) for r in rows];"
            "print('INT8 beats BF16 from width:', {m: crossover_width(rows, m) for m in ('w8a16', 'w8a8')})")
    return [PYTHON, "-c", code]


def steps(args) -> list[tuple[str, list[str], dict]]:
    """(name, command, extra environment) of every check, in order."""
    repeats = ["--repeats", "3" if args.quick else "5"]
    end_to_end = [PYTHON, "benchmarks/bench_end_to_end.py", *repeats, "--decode-steps", "16", "--no-memory"]
    if not teacher_is_available():
        print("the teacher is not cached here: the end-to-end runs use random weights of its shape")
        end_to_end.append("--random-weights")
    nbval = [PYTHON, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout=600",
             "-p", "no:cacheprovider", "-q"]
    return [
        ("cuda tests", [PYTHON, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_quant.py",
                        "tests/test_quant_int8.py", "tests/test_decoder.py"], {}),
        ("gemm", [PYTHON, "benchmarks/bench_gemm.py", "--device", "cuda", *repeats, "--quick"], {}),
        ("crossover", crossover_command(args.quick), {}),
        ("end to end, CUDA graphs", end_to_end, {}),
        ("end to end, compiled", [*end_to_end, "--speedup", "compile", "--variants", "course W8A16", "course W8A8"], {}),
        ("chapter 02, gpu profile", [*nbval, "notebooks/02_int8_inference.ipynb", "solutions/02_int8_inference.ipynb"],
         {"COURSE_PROFILE": "gpu", "COURSE_CHECKS_STRICT": "1"}),
        ("chapters 03-06, gpu profile", [PYTHON, "benchmarks/course_report.py", "--profile", "gpu", "--no-gpu-check",
                                         "--only", "03", "05", "06", "04", "--out", "gpu-check-notebooks"], {}),
    ]


def run_step(title: str, command: list[str], env: dict) -> bool:
    print(f"\n=== {title}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    ok = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}).returncode == 0
    print(f"=== {title}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--only", nargs="*", help="run only the steps whose name starts with one of these")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (the CPU results come from the test suite and "
              "benchmarks/bench_end_to_end.py)")
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    chosen = [s for s in steps(args) if not args.only or any(s[0].startswith(o) for o in args.only)]
    results = {title: run_step(title, command, env) for title, command, env in chosen}
    print("\n" + "\n".join(f"{'ok    ' if ok else 'FAILED'} {title}" for title, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
