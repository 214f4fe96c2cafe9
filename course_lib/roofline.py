"""The machine's limits, measured, and how close a model gets to them: a roofline (chapter 02).

Decode reads every weight once per step and does 2 operations per weight and token: at batch 1 it
is memory-bound, and its limit is

    tokens/s ≤ memory bandwidth / bytes read per token.

Prefill multiplies a whole prompt by each weight: compute-bound, limited by

    tokens/s ≤ matmul peak (operations/s) / (2 · weights per token).

The student measures both limits here (`memory_bandwidth`, `matmul_peak`), counts each scheme's bytes
per token (`decode_bytes_per_token`) and puts the measured speeds against them (`plot_roofline`).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import Timing
from .kernels import cpu_has_int8_dot_products  # noqa: F401 (chapter 02 imports it from here)
from .models import weight_bytes


def _median_seconds(fn, repeats: int, warmup: int = 1) -> Timing:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return Timing.from_times(times)


@torch.no_grad()
def memory_bandwidth(mib: int = 256, repeats: int = 7, device: str | torch.device = "cpu") -> float:
    """Bytes per second this machine reads from memory: summing a `mib`-MiB float32 tensor, far
    larger than any cache, does almost no arithmetic per byte. The fastest of `repeats` runs."""
    if mib < 64 or repeats < 1:
        raise ValueError(f"need mib >= 64 (larger than the caches) and repeats >= 1, got {mib}, {repeats}")
    x = torch.ones(mib * 2**20 // 4, device=device)
    return x.numel() * 4 / _median_seconds(x.sum, repeats).low


@torch.no_grad()
def matmul_peak(kind: str = "fp32", size: int = 1024, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Operations per second (2·M·N·K per product) of a square matrix product of `size`: "fp32",
    "bf16", or "int8" (INT8 × INT8 with int32 sums, `course_lib.quant.int8_matmul`, as W8A8 uses)."""
    from .quant import int8_matmul

    generator = torch.Generator().manual_seed(0)
    if kind in ("fp32", "bf16"):
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
        product = lambda: F.linear(a, b)
    elif kind == "int8":
        a, b = (torch.randint(-127, 128, (size, size), generator=generator, dtype=torch.int8).to(device)
                for _ in range(2))
        product = lambda: int8_matmul(a, b.t())
    else:
        raise ValueError(f"kind must be 'fp32', 'bf16' or 'int8', got {kind!r}")
    return 2 * size ** 3 / _median_seconds(product, repeats).low


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes a batch-1 decode step reads: every stored weight, scale and norm, except the token
    embedding (one row of it per token) unless the output layer reads it too (tied, float)."""
    total = weight_bytes(model)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if getattr(head, "weight", None) is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def gguf_bytes_per_token(path) -> int:
    """The same count for a GGUF file as llama.cpp runs it: every tensor's bytes (the output layer
    of a tied model is the token embedding, read whole at every step)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def roofline_rows(schemes: dict[str, dict], bandwidth: float) -> list[dict]:
    """For each scheme {"bytes per token": ..., "decode tok/s": ...}: its limit bandwidth/bytes and
    the fraction of it the measured speed reaches."""
    rows = []
    for name, s in schemes.items():
        limit = bandwidth / s["bytes per token"]
        rows.append({"scheme": name, "MB per token": s["bytes per token"] / 1e6, "limit tok/s": limit,
                     "decode tok/s": s["decode tok/s"], "of the limit": s["decode tok/s"] / limit})
    return rows


def plot_roofline(rows: Sequence[dict], bandwidth: float, ax=None):
    """Batch-1 decode speed against bytes read per token (log-log): the line is the memory roof
    tokens/s = bandwidth / bytes; each scheme's dot sits at or under it."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    sizes = np.geomspace(min(r["MB per token"] for r in rows) / 1.5, max(r["MB per token"] for r in rows) * 1.5, 50)
    ax.plot(sizes, bandwidth / (sizes * 1e6), "k-", label=f"roof: {bandwidth / 1e9:.1f} GB/s ÷ bytes per token")
    for r in rows:
        ax.scatter(r["MB per token"], r["decode tok/s"], s=50, zorder=3)
        ax.annotate(f"{r['scheme']} ({r['of the limit']:.0%})", (r["MB per token"], r["decode tok/s"]),
                    fontsize=8, xytext=(5, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="MB read per token", ylabel="batch-1 decode tokens/s",
           title="Decode against the memory roof")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    return ax
