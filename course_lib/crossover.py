"""At which width does INT8 beat 16-bit floats? Llama-shaped layers with random weights (chapter 02).

A GPU reads bfloat16 weights at over 4 TB/s and launches a kernel in microseconds: for a model as
narrow as the teacher (576), quantizing activations and the extra kernels cost more than the bytes
INT8 saves. As layers widen, the weight bytes grow with width² and INT8's saving takes over.
`int8_crossover` times batch-1 decode of small Llama-shaped models from width 576 to 4096 — the
16-bit (or, on a CPU, float32) baseline against W8A16 and W8A8 — every one with the same decode loop
(`course_lib.decoder`, CUDA graphs on a GPU: a fair race); `crossover_width` reads off where INT8
starts to win.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from .evaluate import decode_timing

WIDTHS = (576, 1024, 1536, 2048, 3072, 4096)


def llama_shaped(width: int, n_layers: int = 2, vocab: int = 512, dtype=torch.float32, device="cpu", seed: int = 0):
    """A LlamaForCausalLM of `width` with random weights: heads of 64, MLP ≈ 8/3 · width (a multiple
    of 64, as Llama and SmolLM2 use), grouped key/values like the teacher's where the heads allow."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if width % 64 or width < 64:
        raise ValueError(f"width must be a positive multiple of 64 (heads of 64), got {width}")
    heads = width // 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64 * round(width * 8 / 3 / 64),
                         num_hidden_layers=n_layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 3 if heads % 3 == 0 else heads, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def int8_crossover(widths: Sequence[int] = WIDTHS, device=None, batch: int = 1, steps: int = 16, repeats: int = 3,
                   n_layers: int = 2, modes: Sequence[str] = ("w8a16", "w8a8"), speedup: str | None = None) -> list[dict]:
    """One row per width: decode tokens/s of the baseline (bfloat16 on CUDA, float32 on a CPU) and
    of each INT8 mode, and each mode's speedup over the baseline (median of `repeats`)."""
    from .int8_inference import quantize_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for width in widths:
        base = llama_shaped(width, n_layers, dtype=dtype, device=device)
        ids = torch.randint(0, base.config.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(0)).to(device)
        row = {"width": width, "baseline": "BF16" if dtype == torch.bfloat16 else "FP32"}
        timed = {"baseline": base}
        for mode in modes:
            timed[mode] = copy.deepcopy(base)
            quantize_model(timed[mode], mode)
        for name, model in timed.items():
            seconds = decode_timing(model, ids, steps=steps, repeats=repeats, speedup=speedup).median
            row[f"{name} tok/s"] = batch * steps / seconds
        for mode in modes:
            row[f"{mode} speedup"] = row[f"{mode} tok/s"] / row["baseline tok/s"]
        rows.append(row)
        del timed, base
    return rows


def crossover_width(rows: Sequence[dict], mode: str = "w8a8") -> int | None:
    """The smallest width from which `mode` beats the baseline at every larger width measured, or None."""
    winning = None
    for row in sorted(rows, key=lambda r: r["width"]):
        if row[f"{mode} speedup"] > 1:
            winning = winning or row["width"]
        else:
            winning = None
    return winning


def plot_crossover(rows: Sequence[dict], modes: Sequence[str] = ("w8a16", "w8a8"), ax=None):
    """Speedup over the baseline against width; above the line at 1, INT8 wins."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    widths = [r["width"] for r in rows]
    for mode in modes:
        ax.plot(widths, [r[f"{mode} speedup"] for r in rows], "o-", label=mode.upper())
    ax.axhline(1.0, color="gray", ls="--", label=f"{rows[0]['baseline']} (baseline)")
    ax.set(xscale="log", xlabel="model width (log)", ylabel=f"decode speed / {rows[0]['baseline']}",
           title="Where INT8 starts to pay: batch-1 decode, Llama-shaped layers")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend()
    ax.grid(alpha=0.3)
    return ax
