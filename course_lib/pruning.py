"""Which teacher layers a student keeps, chosen by measurement (chapter 04).

Depth, ShortGPT (Men et al. 2024): a decoder layer that barely turns its input, cos(x_in, x_out) ≈ 1,
does little, so its *block influence* BI_l = 1 − E[cos(x_in, x_out)] (the mean over the tokens of
calibration text) ranks the layers, and a pruned model keeps the most influential. `make_student`
keeps those by default; an even spread (DistilBERT-style) is `models.spread_layers`.

Width, Minitron (Muralidharan et al. 2024): an MLP channel i whose activation a_i = act(gate_i·x)·(up_i·x)
is small on calibration text contributes little to down_proj's output, so its importance E|a_i| ranks
the channels of each layer, and `prune_mlp_width` keeps the most important (`make_student(...,
intermediate_size=...)`).
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
def _calibration_pass(model, batches: Sequence[dict], hooks: dict) -> int:
    """Run `model`'s decoder over `batches` (eval mode, no KV cache), calling `hooks[module](mask, args,
    kwargs, output)` after each hooked module's forward, `mask` the batch's real (unpadded) tokens.
    Returns the number of real tokens seen."""
    if isinstance(batches, dict) or not batches:
        raise ValueError("batches must be a non-empty list of {'input_ids', 'attention_mask'} batches")
    current: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(
        lambda m, args, kwargs, output, fn=fn: fn(current["mask"], args, kwargs, output), with_kwargs=True)
        for module, fn in hooks.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            attention = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device)
            current["mask"] = attention.bool()
            model.model(input_ids=ids, attention_mask=attention, use_cache=False)
            count += int(current["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return count


def block_influence(model, batches: Sequence[dict]) -> torch.Tensor:
    """BI_l = 1 − mean cos(x_in, x_out) of each decoder layer l over the real (unpadded) tokens of
    `batches` (ShortGPT, Men et al. 2024). Returns a float64 tensor of one value per layer, in [0, 2]."""
    layers = model.model.layers
    totals = torch.zeros(len(layers), dtype=torch.float64)

    def record(index):
        def add(mask, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            totals[index] += float(F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)[mask].sum())
        return add

    count = _calibration_pass(model, batches, {layer: record(i) for i, layer in enumerate(layers)})
    return 1 - totals / count


def mlp_channel_importance(model, batches: Sequence[dict]) -> torch.Tensor:
    """Minitron's activation importance of every MLP channel: mean |act(gate(x))·up(x)| over the real
    tokens of `batches`, the input of down_proj. Returns float64 [layers, intermediate_size]."""
    layers = model.model.layers
    totals = torch.zeros(len(layers), model.config.intermediate_size, dtype=torch.float64)

    def record(index):
        def add(mask, args, kwargs, output):
            totals[index] += args[0][mask].abs().sum(0).double().cpu()
        return add

    count = _calibration_pass(model, batches, {layer.mlp.down_proj: record(i) for i, layer in enumerate(layers)})
    return totals / count


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


def check_width(intermediate_size, full: int) -> None:
    """A ValueError unless `intermediate_size` is an int in 1..`full` (the model's MLP channels)."""
    if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) or \
            not 1 <= intermediate_size <= full:
        raise ValueError(f"intermediate_size must be an int between 1 and the model's {full}, "
                         f"got {intermediate_size!r}")


@torch.no_grad()
def prune_mlp_width(model, importance: torch.Tensor, intermediate_size: int):
    """Keep, in every decoder layer, the `intermediate_size` MLP channels of highest `importance`
    ([layers, channels], e.g. `mlp_channel_importance`), in their original order: the rows of gate_proj
    and up_proj and the columns of down_proj. Changes `model` in place (and its config) and returns it."""
    layers = model.model.layers
    full = model.config.intermediate_size
    if tuple(importance.shape) != (len(layers), full):
        raise ValueError(f"importance must have shape ({len(layers)}, {full}) (layers, MLP channels), "
                         f"got {tuple(importance.shape)}")
    check_width(intermediate_size, full)
    for layer, scores in zip(layers, importance):
        keep = scores.topk(intermediate_size).indices.sort().values.to(layer.mlp.up_proj.weight.device)
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            linear = getattr(layer.mlp, name)
            linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, keep).clone())
            if dim == 1:
                linear.in_features = intermediate_size
            else:
                linear.out_features = intermediate_size
        layer.mlp.intermediate_size = intermediate_size
    model.config.intermediate_size = intermediate_size
    return model
