"""The GPU checks of chapters 01-02 in one go, for a machine with a CUDA GPU (a few minutes):

    python benchmarks/gpu_check.py [--quick]

1. the CUDA tests (`pytest -m cuda`: the padded INT8 matmul, Int8Linear in BF16, a quantized model);
2. the GEMM benchmark on the GPU (INT8 `_int_mm` vs FP32 vs BF16);
3. the end-to-end benchmark against BF16 (the teacher if it is cached or can be fetched, else its
   architecture with random weights: speed and memory only);
4. batched vs one-at-a-time generation (benchmarks/bench_generation.py).
Without a CUDA GPU it says so and exits 0, so it can sit in any script.
"""
from __future__ import annotations

import argparse
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
    ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
