"""Quantizing the real model: INT8 linear layers, SmoothQuant, and how fast the result runs (chapter 02).

    W8A16  y = x @ (W_q · s_w)^T                      INT8 weights, dequantized on the fly, float matmul
    W8A8   y = (X_q @ W_q^T) · (s_x ⊗ s_w)           X_q per token on the fly, a real INT8 matmul
                                                     (`torch._int_mm`, int32 accumulation), one dequantization
    W4A16  y = x @ (W_q · s_g)^T                      4-bit weights, two a byte, one scale per group of g

`quantize_model` swaps a model's nn.Linear layers for these in place and reports the bytes saved;
`smooth_model` applies SmoothQuant (Xiao et al. 2022) before W8A8. The math is in `course_lib.quant`.
"""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import Timing, benchmark, token_nll
from .models import weight_bytes
from .quant import absmax_quantize, dequantize, int8_matmul, int8_vectorwise_quant

MODES = ("w8a16", "w8a8", "w4a16")
GRANULARITIES = ("channel", "tensor")


def _check_linear(linear) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    return linear


# ----------------------------------------------------------------------------- INT8 layers

class Int8Linear(nn.Module):
    """nn.Linear with INT8 weights (absmax, per output channel or per tensor) and float32 scales.

    mode="w8a16": the weights are dequantized on the fly and multiplied in the input's float dtype.
    mode="w8a8": each token (row) of the input is absmax-quantized on the fly, the product is a real
    INT8 matmul with int32 accumulation, dequantized once by the outer product of the scales.
    With `outlier_threshold` (W8A8 only), LLM.int8(): input columns holding an |x| >= threshold are
    multiplied in floating point instead (with the dequantized INT8 weights, as bitsandbytes does).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 granularity: str = "channel", outlier_threshold: float | None = None, device=None):
        super().__init__()
        if mode not in ("w8a16", "w8a8"):
            raise ValueError(f"mode must be 'w8a16' or 'w8a8', got {mode!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if outlier_threshold is not None and (mode != "w8a8" or not outlier_threshold > 0):
            raise ValueError(f"outlier_threshold must be a positive number and needs mode='w8a8', "
                             f"got {outlier_threshold!r} with mode={mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.granularity, self.outlier_threshold = mode, granularity, outlier_threshold
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        scale_shape = (out_features, 1) if granularity == "channel" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, mode: str = "w8a8", granularity: str = "channel",
                   outlier_threshold: float | None = None) -> "Int8Linear":
        """Quantize `linear`'s weight with absmax (`dim=-1`: one scale per output channel)."""
        linear = _check_linear(linear)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, granularity,
                    outlier_threshold, device=linear.weight.device)
        q, scale = absmax_quantize(linear.weight, 8, dim=-1 if granularity == "channel" else None)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "w8a16":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, dequantize(self.weight, self.weight_scale).to(x.dtype), bias)
        rows = x.reshape(-1, self.in_features)
        x_q, x_scale, columns = _quantize_tokens(x, rows, self.outlier_threshold)
        y = int8_matmul(x_q, self.weight.t()).float()
        y.mul_(x_scale).mul_(self.weight_scale.view(1, -1))  # · (s_x ⊗ s_w), without building it
        if columns is not None and columns.numel():
            w_outliers = dequantize(self.weight[:, columns], self.weight_scale)
            y.addmm_(rows[:, columns].float(), w_outliers.t())
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        extra = f", outlier_threshold={self.outlier_threshold}" if self.outlier_threshold else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"granularity={self.granularity}{extra}")


_last_input: dict = {}


def _quantize_tokens(x: torch.Tensor, rows: torch.Tensor, threshold: float | None):
    """Per-token INT8 of the input rows (LLM.int8()'s version when `threshold`): (q, scale [M, 1],
    outlier columns or None). q, k and v (and gate and up) read the very same tensor one after the
    other, so it is quantized once and reused while its version counter says it is unchanged
    (tensors made under torch.inference_mode have no such counter: they are quantized every time)."""
    reusable = not x.is_inference()
    if reusable and _last_input.get("x") is x and _last_input["key"] == (x._version, threshold):
        return _last_input["value"]
    if threshold:
        x_q, x_absmax, columns = int8_vectorwise_quant(rows, threshold)
        value = (x_q, (x_absmax / 127)[:, None], columns)
    else:
        value = (*absmax_quantize(rows, 8, dim=-1), None)
    if reusable:
        _last_input.update(x=x, key=(x._version, threshold), value=value)
    return value


# ----------------------------------------------------------------------------- 4-bit weights

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values (int8 in [−8, 7], even last dim) packed two a byte: stored as q + 8,
    element 2i in the low nibble and element 2i+1 in the high nibble of byte i."""
    if q.dtype != torch.int8 or q.shape[-1] % 2 or q.min() < -8 or q.max() > 7:
        raise ValueError("q must be int8 in [-8, 7] with an even last dimension")
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [..., n/2] -> int8 [..., n] in [−8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    return pairs.to(torch.int8) - 8


class Int4Linear(nn.Module):
    """Weight-only 4-bit nn.Linear (W4A16): absmax per group of `group_size` weights along the
    input dimension, two weights a byte, float32 scales; dequantized on the fly."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 device=None):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"group_size must be even and divide in_features={in_features}, got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        linear = _check_linear(linear)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                    device=linear.weight.device)
        q, scale = absmax_quantize(linear.weight, 4, group_size=group_size)
        layer.packed.copy_(pack_int4(q))
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(unpack_int4(self.packed), self.weight_scale)
        return F.linear(x, weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# ----------------------------------------------------------------------------- the whole model

@dataclass
class QuantReport:
    """What `quantize_model` did: the layers it swapped and their bytes before and after."""
    mode: str
    layers: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        """How many times smaller the swapped layers got."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def __str__(self) -> str:
        return (f"{self.mode}: {len(self.layers)} linear layers, {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB ({self.ratio:.2f}x smaller)")


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "w8a8", granularity: str = "channel",
                   outlier_threshold: float | None = None, group_size: int = 32,
                   include_lm_head: bool = False) -> QuantReport:
    """Swap every nn.Linear of `model` (in place) for an Int8Linear (mode "w8a16" or "w8a8") or an
    Int4Linear ("w4a16", per group of `group_size`). The output layer `lm_head` stays in float unless
    `include_lm_head` (it is tied to the embedding here, so quantizing it frees no memory)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    report = QuantReport(mode)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (include_lm_head or name.split(".")[-1] != "lm_head")]
    for name, linear in targets:
        if mode == "w4a16":
            quantized = Int4Linear.from_float(linear, group_size)
        else:
            quantized = Int8Linear.from_float(linear, mode, granularity, outlier_threshold)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quantized)
        report.layers.append(name)
        report.bytes_before += weight_bytes(linear)
        report.bytes_after += weight_bytes(quantized)
    return report


def _is_body_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.split(".")[-1] != "lm_head"


@torch.no_grad()
def quantize_with_torchao(model: nn.Module, mode: str = "w8a8") -> nn.Module:
    """The same schemes by torchao, to measure against: W8A8 = Int8DynamicActivationInt8WeightConfig
    (per-token activations, per-channel weights), W8A16 = Int8WeightOnlyConfig. In place; lm_head
    stays in float, as in `quantize_model`."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    configs = {"w8a8": Int8DynamicActivationInt8WeightConfig, "w8a16": Int8WeightOnlyConfig}
    if mode not in configs:
        raise ValueError(f"mode must be one of {tuple(configs)}, got {mode!r}")
    quantize_(model, configs[mode](), filter_fn=lambda module, name: _is_body_linear(module, name))
    return model


@torch.no_grad()
def quantize_with_bitsandbytes(model: nn.Module, threshold: float = 6.0) -> nn.Module:
    """LLM.int8() by bitsandbytes, to measure against: every nn.Linear but lm_head becomes a
    `Linear8bitLt` (INT8 weights, outlier threshold as in transformers' default). In place."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for name, linear in [(n, m) for n, m in model.named_modules() if _is_body_linear(m, n)]:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=threshold)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.float().cpu().clone(), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.to(device))  # .to() quantizes
    return model


# ----------------------------------------------------------------------------- SmoothQuant

@torch.no_grad()
def activation_absmax(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 128,
                      batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Calibration: the largest |x| each nn.Linear's input channel sees over `texts` (name -> [K])."""
    absmax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs):
            seen = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, nn.Linear)]
    try:
        token_nll(model, tokenizer, texts, max_length, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return absmax


def smoothing_scales(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α), the weight max over all layers reading X."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")
    w_absmax = torch.cat([w.abs() for w in weights]).amax(dim=0).float()
    scales = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


@torch.no_grad()
def _smooth(previous: torch.Tensor, linears: Sequence[nn.Linear], x_absmax: torch.Tensor, alpha: float) -> None:
    """X·W^T = (X/s)·(W·s)^T: divide what produces X (a norm's weight, or a layer's output rows) by s
    and multiply the input columns of every layer that reads X by s."""
    scales = smoothing_scales(x_absmax, [lin.weight for lin in linears], alpha).to(previous.device)
    previous.div_(scales.view(-1, *[1] * (previous.dim() - 1)).to(previous.dtype))
    for lin in linears:
        lin.weight.mul_(scales.to(lin.weight.dtype))


def smooth_model(model: nn.Module, x_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> int:
    """Fold SmoothQuant's scales into a Llama-family model, in place; the float model computes the
    same function after it. Per decoder layer: the input norm into q/k/v, the post-attention norm into
    gate/up, and (SwiGLU: down reads act(gate)·up) up's output rows into down. Returns the number of
    smoothed inputs. Calibrate `x_absmax` with `activation_absmax` first."""
    count = 0
    for name, layer in model.named_modules():
        if not all(hasattr(layer, a) for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")):
            continue
        attn, mlp = layer.self_attn, layer.mlp
        groups = [(layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], f"{name}.self_attn.q_proj"),
                  (layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], f"{name}.mlp.gate_proj"),
                  (mlp.up_proj.weight, [mlp.down_proj], f"{name}.mlp.down_proj")]
        for previous, linears, reader in groups:
            if reader not in x_absmax:
                raise KeyError(f"no calibration statistics for {reader}: run activation_absmax on this model")
            _smooth(previous, linears, x_absmax[reader], alpha)
            count += 1
    if count == 0:
        raise ValueError("found no Llama-style decoder layers (input_layernorm, self_attn, mlp) to smooth")
    return count


# ----------------------------------------------------------------------------- speed

def token_batch(tokenizer, texts: Sequence[str], batch_size: int, length: int) -> torch.Tensor:
    """input_ids [batch_size, length] from the first texts that have at least `length` tokens (no padding)."""
    rows = [ids[:length] for ids in tokenizer(list(texts))["input_ids"] if len(ids) >= length]
    if len(rows) < batch_size:
        raise ValueError(f"only {len(rows)} of the texts have {length} tokens; need {batch_size}")
    return torch.tensor(rows[:batch_size])


def _cache_keyword(model: nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output):
    return getattr(output, "cache", None) or output.past_key_values


@torch.no_grad()
def prefill_timing(model: nn.Module, input_ids: torch.Tensor, repeats: int = 3, warmup: int = 1) -> Timing:
    """Seconds to read a prompt batch into the KV cache (logits of the last position only, as
    `generate` does): the compute-bound phase. Median of `repeats`."""
    return benchmark(lambda: model(input_ids=input_ids, use_cache=True, logits_to_keep=1), repeats, warmup)


@torch.no_grad()
def decode_timing(model: nn.Module, input_ids: torch.Tensor, steps: int = 16, repeats: int = 3,
                  warmup: int = 1) -> Timing:
    """Seconds for `steps` greedy one-token steps after an untimed prefill of `input_ids`: the
    memory-bound phase, every weight read once per step. Median of `repeats`."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1, repeats >= 1, warmup >= 0; got {steps}, {repeats}, {warmup}")
    keyword = _cache_keyword(model)
    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    times = []
    for run in range(warmup + repeats):
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{keyword: _output_cache(out)})
        sync()
        if run >= warmup:
            times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), tuple(times))


def interleaved_speed(models: dict[str, nn.Module], prompt_ids: torch.Tensor, decode_ids: torch.Tensor,
                      decode_steps: int = 16, repeats: int = 3) -> dict[str, dict[str, Timing]]:
    """Prefill and decode timings of several models, measured round-robin: one warm-up round, then
    `repeats` rounds of every model in turn, so that a busy machine slows them all alike.
    Returns {name: {"prefill": Timing, "decode": Timing}} (medians over the rounds)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = {name: {"prefill": [], "decode": []} for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            prefill = prefill_timing(model, prompt_ids, repeats=1, warmup=0).median
            decode = decode_timing(model, decode_ids, steps=decode_steps, repeats=1, warmup=0).median
            if round_:  # round 0 warms every model up
                times[name]["prefill"].append(prefill)
                times[name]["decode"].append(decode)
    return {name: {phase: Timing(statistics.median(ts), min(ts), max(ts), tuple(ts)) for phase, ts in phases.items()}
            for name, phases in times.items()}
