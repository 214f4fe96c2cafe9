"""Which teacher layers a student keeps, chosen by measurement (chapter 04).

ShortGPT (Men et al. 2024): a decoder layer that barely turns its input, cos(x_in, x_out) ≈ 1, does
little, so its *block influence* BI_l = 1 − E[cos(x_in, x_out)] (the mean over the tokens of
calibration text) ranks the layers, and a pruned model keeps the most influential. `make_student`
keeps those by default; an even spread (DistilBERT-style) is `models.spread_layers`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .models import load_tokenizer
from .teacher_data import teacher_dataset
from .train import sft_batches


def calibration_batches(tokenizer=None, n_examples: int = 8, max_length: int = 128,
                        batch_size: int = 8) -> list[dict]:
    """Calibration text: the first `n_examples` teacher-written *training* answers (with their
    prompts), never the held-out answers or the human corpus the chapters evaluate on."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    rows = teacher_dataset("train", n=n_examples)
    return sft_batches(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], batch_size, max_length)


@torch.no_grad()
def block_influence(model, batches: Sequence[dict]) -> torch.Tensor:
    """BI_l = 1 − mean cos(x_in, x_out) of each decoder layer l over the real (unpadded) tokens of
    `batches` (ShortGPT, Men et al. 2024). Returns a float64 tensor of one value per layer, in [0, 2]."""
    if isinstance(batches, dict) or not batches:
        raise ValueError("batches must be a non-empty list of {'input_ids', 'attention_mask'} batches")
    layers = model.model.layers
    totals = torch.zeros(len(layers), dtype=torch.float64)
    mask: torch.Tensor | None = None

    def hook(index):
        def record(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            totals[index] += float(cos[mask].sum())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            attention = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device)
            mask = attention.bool()
            model.model(input_ids=ids, attention_mask=attention, use_cache=False)
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return 1 - totals / count


def most_influential(influence: Sequence[float] | torch.Tensor, n_layers: int) -> list[int]:
    """The `n_layers` layers of highest block influence, in model order (ties: the earlier layer)."""
    values = [float(v) for v in influence]
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= len(values):
        raise ValueError(f"n_layers must be an int between 1 and the model's {len(values)} layers, got {n_layers!r}")
    ranked = sorted(range(len(values)), key=lambda i: -values[i])
    return sorted(ranked[:n_layers])


def measured_layers(model, n_layers: int, batches: Sequence[dict] | None = None) -> list[int]:
    """The layers a student of `n_layers` keeps: the most influential on `batches`
    (default: `calibration_batches()` with the teacher's tokenizer)."""
    return most_influential(block_influence(model, batches or calibration_batches()), n_layers)
