"""Quantizing the real model: INT8 and 4-bit linear layers, SmoothQuant, and the GGUF-free path to
decode speed (chapter 02).

    W8A16  y = (x @ W_qᵀ) · s_w                     INT8 weights, float activations: computes in x's dtype
                                                    (float32 on a CPU, bfloat16 on a GPU)
    W8A8   y = (X_q @ W_qᵀ) · (s_x ⊗ s_w)          X_q per token on the fly, an INT8 matmul with int32
                                                    sums, dequantized once in float32
    W4A16  y = x @ (W_q · s_g)ᵀ                     4-bit weights, two a byte, one scale per group of g;
                                                    computes in x's dtype

Scales are float32 and stay float32 when the model is cast (`model.to(torch.bfloat16)`). The
matrix products are `course_lib.kernels`: loops that read each quantized weight byte once (decode)
and torch's GEMMs (prefill, CUDA). `quantize_model` swaps a model's nn.Linear layers for these in
place and reports the bytes; `smooth_model` applies SmoothQuant (Xiao et al. 2022) before W8A8.
The math is in `course_lib.quant`; the decode loop that fuses q/k/v and gate/up is `course_lib.decoder`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .kernels import (cpu_has_int8_dot_products, dequantized_int8_product, int4_weight_linear, int8_dynamic_linear,
                      int8_weight_linear)
from .models import weight_bytes
from .quant import absmax_quantize, int8_vectorwise_quant

MODES = ("w8a16", "w8a8", "w4a16")
GRANULARITIES = ("channel", "tensor")


def _check_linear(linear) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    return linear


class _Float32Scales(nn.Module):
    """A quantized layer whose `weight_scale` stays float32 when the module is cast to another
    dtype (`.to(torch.bfloat16)`, `.half()`): only its device follows. Scales rounded to bfloat16
    would shift every weight of a row by up to 0.4 %."""

    def _apply(self, fn, recurse=True):
        scale = self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_scale"] = scale.to(fn(scale.reshape(-1)[:0]).device)
        return self

    @property
    def quantized_weights(self) -> int:
        """How many weights the layer stores quantized (`models.count_parameters` counts them)."""
        return self.in_features * self.out_features

    def _bias_for(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ----------------------------------------------------------------------------- INT8 layers

class Int8Linear(_Float32Scales):
    """nn.Linear with INT8 weights (absmax, per output channel or per tensor) and float32 scales.

    mode="w8a16": y = (x @ W_qᵀ) · s_w in x's dtype; the INT8 weights are read once and converted
    on the fly (`kernels.int8_weight_linear`), never dequantized into a float copy.
    mode="w8a8": each token (row) of the input is absmax-quantized on the fly, the product is a real
    INT8 matmul with int32 accumulation, dequantized once by the outer product of the scales; the
    result is float32, cast back to x's dtype. `int8_gemm` (decided once, when the layer is built):
    whether this machine's INT8 GEMM beats float32 — without INT8 dot-product instructions (a CPU
    with AVX2 alone) a prefill sums the same integer products in a float32 GEMM instead.
    With `outlier_threshold` (W8A8 only), LLM.int8(): input columns holding an |x| >= threshold are
    multiplied in floating point instead (with the dequantized INT8 weights, as bitsandbytes does);
    finding those columns reads the device once per call (a host sync, as in bitsandbytes).
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
        self.int8_gemm = cpu_has_int8_dot_products()
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
            layer.bias = linear.bias.detach().clone()
        return layer

    @classmethod
    @torch.no_grad()
    def concat(cls, layers: Sequence["Int8Linear"]) -> "Int8Linear":
        """One layer computing all of `layers` (same input, same mode) side by side: their INT8 rows
        stacked, per-tensor scales spread over their rows. Exactly the same outputs, one call, one
        quantization of the input (what `course_lib.decoder` does with q/k/v and gate/up)."""
        first = layers[0]
        if any(not isinstance(layer, Int8Linear) or (layer.in_features, layer.mode, layer.outlier_threshold)
               != (first.in_features, first.mode, first.outlier_threshold) for layer in layers):
            raise ValueError("concat needs Int8Linear layers with the same in_features, mode and outlier_threshold")
        has_bias = any(layer.bias is not None for layer in layers)
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), has_bias, first.mode,
                    "channel", first.outlier_threshold, device=first.weight.device)
        fused.weight = torch.cat([layer.weight for layer in layers])
        fused.weight_scale = torch.cat([layer.weight_scale.expand(layer.out_features, 1) for layer in layers])
        if has_bias:
            fused.bias = torch.cat([layer.bias if layer.bias is not None else
                                    torch.zeros(layer.out_features, device=first.weight.device) for layer in layers])
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.mode == "w8a16":
            y = int8_weight_linear(rows, self.weight, self.weight_scale)
        elif self.outlier_threshold is None:
            y = int8_dynamic_linear(rows, self.weight, self.weight_scale, self.int8_gemm)
        else:
            y = self._llm_int8(rows)
        y = self._bias_for(y)
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def _llm_int8(self, rows: torch.Tensor) -> torch.Tensor:
        """LLM.int8(): INT8 for the ordinary columns, float32 for the outlier columns."""
        x_q, x_absmax, columns = int8_vectorwise_quant(rows, self.outlier_threshold)
        y = dequantized_int8_product(x_q, (x_absmax / 127)[:, None], self.weight, self.weight_scale, self.int8_gemm)
        if columns.numel():
            w_outliers = self.weight[:, columns].float() * self.weight_scale.view(-1, 1)
            y.addmm_(rows[:, columns].float(), w_outliers.t())
        return y

    def extra_repr(self) -> str:
        extra = f", outlier_threshold={self.outlier_threshold}" if self.outlier_threshold else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"granularity={self.granularity}{extra}")


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


def _check_group_size(group_size, in_features: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2 \
            or in_features % group_size:
        raise ValueError(f"group_size must be an even positive integer that divides in_features={in_features} "
                         f"(e.g. 32), got {group_size!r}")
    return group_size


class Int4Linear(_Float32Scales):
    """Weight-only 4-bit nn.Linear (W4A16): absmax per group of `group_size` weights along the
    input dimension, two weights a byte, float32 scales. y = x @ Wᵀ in x's dtype, the 4-bit weights
    read once and converted on the fly (`kernels.int4_weight_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _check_group_size(group_size, in_features)
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
            layer.bias = linear.bias.detach().clone()
        return layer

    @classmethod
    @torch.no_grad()
    def concat(cls, layers: Sequence["Int4Linear"]) -> "Int4Linear":
        """One layer computing all of `layers` (same input, same group size) side by side."""
        first = layers[0]
        if any(not isinstance(layer, Int4Linear) or (layer.in_features, layer.group_size)
               != (first.in_features, first.group_size) for layer in layers):
            raise ValueError("concat needs Int4Linear layers with the same in_features and group_size")
        has_bias = any(layer.bias is not None for layer in layers)
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), has_bias, first.group_size,
                    device=first.packed.device)
        fused.packed = torch.cat([layer.packed for layer in layers])
        fused.weight_scale = torch.cat([layer.weight_scale for layer in layers])
        if has_bias:
            fused.bias = torch.cat([layer.bias if layer.bias is not None else
                                    torch.zeros(layer.out_features, device=first.packed.device) for layer in layers])
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_weight_linear(x.reshape(-1, self.in_features), self.packed, self.weight_scale, self.group_size)
        return self._bias_for(y).view(*x.shape[:-1], self.out_features)

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
def quantize_model(model: nn.Module, mode: str = "w8a8", granularity: str | None = None,
                   outlier_threshold: float | None = None, group_size: int | None = None,
                   include_lm_head: bool = False) -> QuantReport:
    """Swap every nn.Linear of `model` (in place) for an Int8Linear (mode "w8a16" or "w8a8", per
    `granularity` "channel" (default) or "tensor", LLM.int8() with `outlier_threshold`) or an
    Int4Linear ("w4a16", per group of `group_size`, default 32). An option that does not apply to
    the mode is an error. The output layer `lm_head` stays in float unless `include_lm_head`: it is
    tied to the embedding here, so its INT8 copy is stored beside the float embedding (the bytes
    count it) — it costs 28 MB more memory and saves 85 MB of reads per decoded token."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    wrong = [name for name, value, modes in (("granularity", granularity, ("w8a16", "w8a8")),
                                              ("outlier_threshold", outlier_threshold, ("w8a8",)),
                                              ("group_size", group_size, ("w4a16",)))
             if value is not None and mode not in modes]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} does not apply to mode={mode!r}: granularity is for w8a16/w8a8, "
                         "outlier_threshold for w8a8 (LLM.int8()), group_size for w4a16")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (include_lm_head or name.split(".")[-1] != "lm_head")]
    if mode == "w4a16":  # checked for every layer before any is swapped
        for _, linear in targets:
            _check_group_size(32 if group_size is None else group_size, linear.in_features)
    report = QuantReport(mode)
    for name, linear in targets:
        if mode == "w4a16":
            quantized = Int4Linear.from_float(linear, 32 if group_size is None else group_size)
        else:
            quantized = Int8Linear.from_float(linear, mode, granularity or "channel", outlier_threshold)
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
    """Calibration: the largest |x| each nn.Linear's input channel sees over `texts` (name -> [K]),
    over real tokens only (padding positions are left out: they are not text)."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    device = next(model.parameters()).device
    absmax: dict[str, torch.Tensor] = {}
    real = {}  # the current batch's mask of real tokens, read by the hooks

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach()
            seen = x[real["mask"]].abs().amax(dim=0).float() if x.dim() == 3 else \
                x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, nn.Linear)]
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            real["mask"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
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
