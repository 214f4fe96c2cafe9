"""GEMM: a real INT8 matmul (`torch._int_mm`, int32 accumulation) against FP32 and BF16, same shapes.

    python benchmarks/bench_gemm.py [--repeats 7] [--threads N] [--device cpu|cuda]

Shapes: the teacher's linear layers (K -> N: 576 -> 576 q/o, 576 -> 192 k/v, 576 -> 1536 gate/up,
1536 -> 576 down) with M = 1, 8, 16, 32 tokens (decode) and M = 1024 (prefill, 8 x 128), plus
large squares. The INT8 weight is stored [N, K] and passed transposed, as `Int8Linear` does.
Repeats are interleaved across the three kinds; medians; speedup = FP32 time / other time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from course_lib.quant import int8_matmul
from course_lib.runtime import pick_device

MODEL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
DECODE_M = [1, 8, 16, 32]
PREFILL_M = [1024]
SQUARES = [2048, 4096]


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    out = [(m, k, n) for m in DECODE_M + PREFILL_M for k, n in MODEL_SHAPES]
    out += [(s, s, s) for s in (SQUARES[:1] if quick else SQUARES)]
    return out


def time_once(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench_shape(m: int, k: int, n: int, device: torch.device, repeats: int) -> dict:
    """Median seconds of x @ W^T in FP32, BF16 and INT8 for one shape."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device)
    x_bf16, w_bf16 = x.bfloat16(), w.bfloat16()
    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
    w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
    kinds = {"fp32": lambda: torch.nn.functional.linear(x, w),
             "bf16": lambda: torch.nn.functional.linear(x_bf16, w_bf16),
             "int8": lambda: int8_matmul(x_q, w_q.t())}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = max(1, int(2e8 // (m * k * n)))  # several calls per timing for tiny shapes
    times = {kind: [] for kind in kinds}
    for round_ in range(repeats + 1):
        for kind, fn in kinds.items():
            seconds = time_once(lambda: [fn() for _ in range(inner)], sync) / inner
            if round_:  # round 0 warms up
                times[kind].append(seconds)
    return {kind: statistics.median(ts) for kind, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default=None, help="default: pick_device()")
    parser.add_argument("--quick", action="store_true", help="one large square only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else pick_device()
    print(f"device: {device} ({torch.get_num_threads()} threads); median of {args.repeats} interleaved "
          f"repeats; speedup = FP32 time / time")
    head = f"{'M':>5s} {'K':>5s} {'N':>5s} {'FP32 ms':>9s} {'BF16 x':>7s} {'INT8 x':>7s} {'INT8 TOP/s':>11s}"
    print(head)
    print("-" * len(head))
    for m, k, n in shapes(args.quick):
        t = bench_shape(m, k, n, device, args.repeats)
        print(f"{m:5d} {k:5d} {n:5d} {t['fp32'] * 1e3:9.3f} {t['fp32'] / t['bf16']:6.2f}x "
              f"{t['fp32'] / t['int8']:6.2f}x {2 * m * k * n / t['int8'] / 1e12:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
