"""Quantization math: absmax and zero-point quantization, granularity, LLM.int8() (chapters 01-02).

    absmax (symmetric):      q = round(qmax / max|x| · x),  x ≈ q · scale,  scale = max|x| / qmax
    zero-point (asymmetric): scale = (max − min) / (2^b − 1),  zero_point = round(−min / scale) − 2^(b−1),
                             q = clamp(round(x / scale) + zero_point),  x ≈ (q − zero_point) · scale

with qmax = 2^(b−1) − 1 (127 for 8 bits). Granularity: `dim=None` one scale for the whole tensor,
`dim=d` the max taken along d (`dim=-1` on an nn.Linear weight: one scale per output channel),
`group_size=g` one scale per g consecutive values of the last dimension.

The INT8 layers for the real model live in `course_lib.int8_inference` and the GGUF blocks in
`course_lib.gguf_blocks`; both are reachable from here too (`course_lib.quant.Int8Linear`, ...).
"""
from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 8


# ----------------------------------------------------------------------------- checks and shapes

def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}")
    return bits


def _check_tensor(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}"
                        + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    return x.float()


def _check_granularity(x: torch.Tensor, dim, group_size) -> None:
    if dim is not None and group_size is not None:
        raise ValueError("give dim (per-channel) or group_size (per-group), not both")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim()):
        raise ValueError(f"dim must be None or an axis of x (x has {x.dim()} dimensions), got {dim!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size={group_size} does not divide the last dimension of x "
                             f"({x.shape[-1]}); choose a divisor of {x.shape[-1]}")


def _reduce(x: torch.Tensor, op, dim, group_size) -> torch.Tensor:
    """`op` (amax or amin) per tensor (0-d), along `dim` (kept), or per group ([..., n // g])."""
    if group_size is not None:
        return op(x.unflatten(-1, (-1, group_size)), dim=-1)
    return op(x) if dim is None else op(x, dim=dim, keepdim=True)


def expand_scale(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-group `scale` ([..., n // g]) repeated g times along the last dim; others as they are
    (per-tensor and per-channel scales broadcast by themselves)."""
    if scale.dim() == len(shape) and scale.dim() > 0 and scale.shape[-1] not in (1, shape[-1]):
        if shape[-1] % scale.shape[-1]:
            raise ValueError(f"scale of shape {tuple(scale.shape)} fits no grouping of shape {tuple(shape)}")
        return scale.repeat_interleave(shape[-1] // scale.shape[-1], dim=-1)
    return scale


def _absmax_floor(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """absmax ready to divide by: an all-zero slice counts as 1, and a tiny one is raised to
    qmax·eps, so that the scale absmax/qmax never drops below float32's eps (torchao's floor) and
    qmax/absmax never overflows to infinity."""
    floored = absmax.clamp(min=qmax * torch.finfo(torch.float32).eps)
    return torch.where(absmax == 0, torch.ones_like(absmax), floored)


def absmax_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`absmax_quantize(x, 8, dim=-1)` without the argument checks, for the INT8 layers' hot path
    (one scale per token, a float32 x [..., K] -> q int8, scale [..., 1]): the same numbers, and no
    host synchronization (the finiteness check of the public function reads the device)."""
    absmax = _absmax_floor(x.abs().amax(dim=-1, keepdim=True), 127)
    return (x * (127 / absmax)).round_().to(torch.int8), absmax / 127


def _finite_stats(*stats: torch.Tensor) -> None:
    # max and min propagate NaN and inf, so checking the (small) statistics checks all of x cheaply
    if not all(bool(torch.isfinite(s).all()) for s in stats):
        raise ValueError("x must be finite: it contains NaN or infinite values")


# ----------------------------------------------------------------------------- chapter 01: the formulas

def absmax_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = None,
                    group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax (symmetric) quantization, the slide's formula: q = round(qmax / max|x| · x).

    Returns (q as int8 in [−qmax, qmax], scale = max|x| / qmax as float32), so x ≈ q · scale.
    An all-zero slice gets q = 0 and scale 1/qmax. Chapter 01 teaches it; chapter 02 runs it per token.
    """
    qmax = 2 ** (_check_bits(bits) - 1) - 1
    x = _check_tensor(x)
    _check_granularity(x, dim, group_size)
    absmax = _reduce(x.abs(), torch.amax, dim, group_size)
    _finite_stats(absmax)
    absmax = _absmax_floor(absmax, qmax)
    q = x * expand_scale(qmax / absmax, x.shape)  # |q| <= qmax · (1 + ε): no clamp needed
    return q.round_().to(torch.int8), absmax / qmax


def zeropoint_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = None,
                       group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-point (asymmetric) quantization: the range [min, max] mapped onto all 2^b levels.

    scale = (max − min)/(2^b − 1), zero_point = round(−min/scale) − 2^(b−1),
    q = clamp(round(x/scale) + zero_point, −2^(b−1), 2^(b−1) − 1). Returns (q int8, scale float32,
    zero_point int32), so x ≈ (q − zero_point) · scale. A constant slice gets scale 1. Chapter 01.
    """
    half = 2 ** (_check_bits(bits) - 1)
    x = _check_tensor(x)
    _check_granularity(x, dim, group_size)
    low, high = _reduce(x, torch.amin, dim, group_size), _reduce(x, torch.amax, dim, group_size)
    _finite_stats(low, high)
    scale = (high - low) / (2 * half - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.round(-low / scale) - half
    q = torch.round(x / expand_scale(scale, x.shape)) + expand_scale(zero_point, x.shape)
    return q.clamp_(-half, half - 1).to(torch.int8), scale, zero_point.to(torch.int32)


def _fitted(name: str, t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`t` (a scale or zero point) expanded to q's grouping, or a ValueError saying why it does not fit."""
    try:
        expanded = expand_scale(t, q.shape)
        fits = torch.broadcast_shapes(expanded.shape, q.shape) == q.shape
    except (RuntimeError, ValueError):
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not fit q of shape {tuple(q.shape)}: expected one "
                         "value (per tensor), q's shape with 1 along the reduced dim (per channel) or q's shape "
                         "with its last dim divided by group_size (per group), as the quantize function returned it")
    return expanded


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ = q · scale (absmax) or (q − zero_point) · scale (zero-point), as float32, for any granularity."""
    if not isinstance(q, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError(f"q and scale must be torch.Tensors, got {type(q).__name__} and {type(scale).__name__}")
    if zero_point is not None and not isinstance(zero_point, torch.Tensor):
        raise TypeError(f"zero_point must be None or a torch.Tensor, got {type(zero_point).__name__}")
    if q.is_floating_point() and not torch.equal(q, q.round()):
        raise ValueError("q must hold integers (the output of a quantize function)")
    values = q.float()
    if zero_point is not None:
        values = values - _fitted("zero_point", zero_point, q).float()
    return values * _fitted("scale", scale, q).float()


def fake_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = None, group_size: int | None = None,
                  zero_point: bool = False) -> torch.Tensor:
    """x quantized and dequantized again: what the model computes with after quantization."""
    quantize = zeropoint_quantize if zero_point else absmax_quantize
    return dequantize(*quantize(x, bits, dim, group_size))


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """‖x − x̂‖ / ‖x‖ (Frobenius): the quantization noise relative to the signal."""
    x, x_hat = _check_tensor(x).detach(), _check_tensor(x_hat, "x_hat").detach()
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape")
    norm = torch.linalg.vector_norm(x)
    if norm == 0:
        raise ValueError("x is all zeros: the relative error ‖x − x̂‖ / ‖x‖ is undefined (compare "
                         "‖x − x̂‖ itself, or use a reference that is not zero)")
    return float(torch.linalg.vector_norm(x - x_hat) / norm)


def clipping_error_split(x: torch.Tensor, clip: float, bits: int = 8) -> tuple[float, float]:
    """Mean squared error of absmax quantization with its range clipped at ±`clip`, split in two:
    (rounding error of the values inside the range, clipping error of the values outside it).
    A smaller clip means finer steps (less rounding error) but more values cut off (chapter 01)."""
    qmax = 2 ** (_check_bits(bits) - 1) - 1
    x = _check_tensor(x)
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip!r}")
    scale = clip / qmax
    x_hat = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    inside = x.abs() <= clip
    squared = (x - x_hat) ** 2
    return float(squared[inside].sum() / x.numel()), float(squared[~inside].sum() / x.numel())


def float32_fields(value: float) -> tuple[str, str, str]:
    """The IEEE 754 bits of a float32 as (sign: 1 bit, exponent: 8 bits, mantissa: 23 bits)."""
    bits = torch.tensor([value], dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF
    text = f"{bits:032b}"
    return text[0], text[1:9], text[9:]


# ----------------------------------------------------------------------------- chapter 02: LLM.int8()

def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (int8 [M, K]) @ b (int8 [K, N]) -> int32 [M, N], a real INT8 matmul (`torch._int_mm`).

    CUDA (cuBLASLt) needs M > 16 and K, N multiples of 8: there the operands are zero-padded, which
    leaves the product unchanged, and the result is cut back to [M, N]; b is passed column-major,
    the one layout all CUDA versions support. Pass b as `weight.t()` of a contiguous [N, K] weight:
    that is column-major already, and also the fastest layout on a CPU.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"need a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    (m, k), n = a.shape, b.shape[1]
    pad_m, pad_k, pad_n = max(17 - m, 0), -k % 8, -n % 8
    b_rows = b.t()  # [N, K]
    if pad_m or pad_k:
        a = torch.nn.functional.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b_rows = torch.nn.functional.pad(b_rows, (0, pad_k, 0, pad_n))
    return torch._int_mm(a.contiguous(), b_rows.contiguous().t())[:m, :n]


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8()'s activation quantization (Dettmers et al. 2022), as bitsandbytes defines it.

    Entries with |x| >= threshold are outliers; their columns are the outlier columns. The outliers
    are zeroed, each row is absmax-quantized to int8, and the outlier columns are zeroed in q (they
    are multiplied in floating point instead). threshold=0 turns the decomposition off.
    Returns (q int8 [rows, K], row absmax [rows] float32, outlier column indices int64).
    """
    x = _check_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"x must be a matrix [rows, features], got shape {tuple(x.shape)}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    columns = torch.empty(0, dtype=torch.long, device=x.device)
    if threshold > 0:
        outliers = x.abs() >= threshold
        columns = outliers.any(dim=0).nonzero().view(-1)
        if columns.numel():
            x = x.masked_fill(outliers, 0)
    q, scale = absmax_quantize(x, 8, dim=-1)
    if columns.numel():
        q[:, columns] = 0
    return q, x.abs().amax(dim=-1), columns


def llm_int8_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """x @ weight.T the LLM.int8() way: vector-wise INT8 (per-row scales of x, per-output-channel
    scales of the weight) for most columns, the outlier columns of x (|x| >= threshold) in float.

        y = (X_q @ W_q^T) · (s_x ⊗ s_w) + X[:, outliers] @ W[:, outliers]^T
    """
    weight = _check_tensor(weight, "weight")
    x = _check_tensor(x)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] must share K, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    x_q, x_absmax, columns = int8_vectorwise_quant(rows, threshold)
    w_q, w_scale = absmax_quantize(weight, 8, dim=-1)
    y = int8_matmul(x_q, w_q.t()).float() * ((x_absmax / 127)[:, None] * w_scale.view(1, -1))
    if columns.numel():
        y = y + rows[:, columns] @ weight[:, columns].t()
    return y.view(*x.shape[:-1], weight.shape[0])


# The INT8 layers and the GGUF blocks are modules of their own; `course_lib.quant` is the one door
# to them (COURSE.md). Imported last: int8_inference imports the math above from here, and the
# package imports this module first (course_lib/__init__.py), so both orders of import work.
from .gguf_blocks import (GGUF_BLOCKS, GGUFFile, decode_gguf_blocks, encode_gguf_blocks,  # noqa: E402,F401
                          read_gguf_tensor)
from .int8_inference import (Int4Linear, Int8Linear, QuantReport, activation_absmax, pack_int4,  # noqa: E402,F401
                             quantize_model, smooth_model, unpack_int4)
