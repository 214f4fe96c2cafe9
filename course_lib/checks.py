"""Instant feedback for exercises: `check_<exercise>(learner_fn)` prints a verdict, never a traceback.

Each check runs the learner's function on small fixed inputs, compares with course_lib's own
implementation and says what differs: the first differing values and the largest difference.
"""
from __future__ import annotations

import math
import os
import traceback
from typing import Any, Callable, Mapping, Sequence

import torch

PASS, FAIL = "✅", "❌"


class CheckResult:
    """The verdict of one check, truthy when passed. `verdict()` is the friendly text."""

    def __init__(self, name: str, passed: bool, details: str = ""):
        self.name, self.passed, self.details = name, passed, details

    def __bool__(self) -> bool:
        return self.passed

    def verdict(self) -> str:
        head = f"{PASS if self.passed else FAIL} {self.name}: {'passed' if self.passed else 'not yet'}"
        return head + (f"\n   {self.details}" if self.details else "")

    def __repr__(self) -> str:
        return f"CheckResult({self.name!r}, passed={self.passed})"


def report(result: CheckResult) -> CheckResult:
    """Print the verdict. With COURSE_CHECKS_STRICT=1 (the test suite) a failed check raises, so a
    broken solution notebook fails CI while a learner only ever sees the friendly message."""
    print(result.verdict())
    if not result.passed and os.environ.get("COURSE_CHECKS_STRICT") == "1":
        raise AssertionError(result.verdict())
    return result


def describe_difference(actual: Any, expected: Any, atol: float = 1e-6, rtol: float = 1e-5) -> str | None:
    """None when `actual` matches `expected`; else a sentence with shapes or first differing values."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return f"expected a {type(expected).__name__} of {len(expected)} items, got {_short(actual)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            if (why := describe_difference(a, e, atol, rtol)) is not None:
                return f"item {i}: {why}"
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"expected a tensor, got {_short(actual)}"
        if actual.shape != expected.shape:
            return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        close = torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
        if bool(close.all()):
            return None
        bad = (~close).nonzero()
        first = [tuple(int(i) for i in idx) for idx in bad[:3]]
        shown = ", ".join(f"at {i}: got {a[i].item():.6g}, expected {e[i].item():.6g}" for i in first)
        return (f"{len(bad)} of {e.numel()} values differ ({shown}); "
                f"max |difference| = {(a - e).abs().nan_to_num(float('inf')).max().item():.3g}")
    if isinstance(expected, float):
        if not isinstance(actual, (int, float)) and not (isinstance(actual, torch.Tensor) and actual.numel() == 1):
            return f"expected a number, got {_short(actual)}"
        actual = float(actual)
        return None if abs(actual - expected) <= atol + rtol * abs(expected) else \
            f"got {actual:.6g}, expected {expected:.6g}"
    return None if actual == expected else f"got {_short(actual)}, expected {_short(expected)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def run_check(name: str, learner_fn: Callable, cases: list[tuple[tuple, dict, Any]],
              atol: float = 1e-6, rtol: float = 1e-5) -> CheckResult:
    """Call `learner_fn(*args, **kwargs)` on each case, compare with the expected value, report."""
    return report(_run_cases(name, learner_fn, cases, atol, rtol))


def _run_cases(name, learner_fn, cases, atol, rtol) -> CheckResult:
    if not callable(learner_fn):
        return CheckResult(name, False, f"expected a function, got {_short(learner_fn)}")
    for args, kwargs, expected in cases:
        call = ", ".join([_short(a) if not isinstance(a, torch.Tensor) else f"tensor{tuple(a.shape)}"
                          for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        try:
            actual = learner_fn(*args, **kwargs)
        except NotImplementedError:
            return CheckResult(name, False, "the function still raises NotImplementedError: "
                                            "replace `# YOUR CODE HERE` with your code")
        except Exception as error:  # a learner's bug: show where, briefly
            where = traceback.extract_tb(error.__traceback__)[-1]
            return CheckResult(name, False, f"calling it with ({call}) raised {type(error).__name__}: "
                                            f"{error} (line {where.lineno}: {where.line})")
        if (why := describe_difference(actual, expected, atol, rtol)) is not None:
            return CheckResult(name, False, f"with ({call}): {why}")
    return CheckResult(name, True, f"{len(cases)} case(s) match")


# ----------------------------------------------------------------------------- predict-then-run, open experiments

def check_prediction(question: str, prediction: Any, outcome: Any, choices: Sequence | None = None,
                     why: str = "", within: float | None = None) -> CheckResult:
    """Predict-then-run: the learner's `prediction` (a value, or a function returning it), written
    before the run, against the `outcome` the run measured. With `choices`, the prediction must be
    one of them and equal the outcome; with `within`, a number within a factor `within` of the
    measured one. `why` explains the outcome, whatever the verdict."""
    if choices is not None and outcome not in choices:
        raise ValueError(f"outcome must be one of {list(choices)}, got {outcome!r}")
    name = f"prediction: {question}"
    if callable(prediction):
        prediction, failed = _learner_call(name, "your prediction", prediction)
        if failed is not None:
            return report(failed)
    if choices is not None and prediction not in choices:
        return report(CheckResult(name, False, f"answer with one of {', '.join(map(repr, choices))}; "
                                               f"got {_short(prediction)}"))
    if within is not None:
        if not isinstance(prediction, (int, float)) or isinstance(prediction, bool) or not prediction > 0:
            return report(CheckResult(name, False, f"predict a positive number, got {_short(prediction)}"))
        ratio = max(prediction / outcome, outcome / prediction)
        passed = ratio <= within
        told = f"you predicted {prediction:.4g}; the run measured {outcome:.4g} ({ratio:.2g}x off, within {within:g}x passes)"
    else:
        passed = prediction == outcome
        told = f"you predicted {prediction!r}; the run measured {outcome!r}"
    return report(CheckResult(name, passed, told + (f"\n   why: {why}" if why else "")))


TRENDS = {"increasing": 1, "decreasing": -1}


def check_experiment(name: str, results: Mapping, recompute: Callable[[Any], Any], setting: str = "setting",
                     trends: Mapping[str, str] | None = None, min_settings: int = 3, rtol: float = 1e-4,
                     slack: float = 0.0, why: str = "") -> CheckResult:
    """An open experiment, graded for consistency rather than a value: `results` maps each setting
    the learner chose to {metric: value} (or one value); each must equal `recompute(setting)`, the same
    metrics recomputed by course_lib from the learner's own outputs; with `trends`
    ({metric: "increasing" | "decreasing"}) a metric that theory orders must follow the setting,
    within a relative `slack`. `why` says why the trend must hold."""
    result = _experiment(name, results, recompute, setting, dict(trends or {}), min_settings, rtol, slack)
    if not result.passed and why and "should" in result.details:
        result.details += f"\n   why: {why}"
    return report(result)


def _as_metrics(value: Any) -> dict:
    return dict(value) if isinstance(value, Mapping) else {"result": value}


def _experiment(name, results, recompute, setting, trends, min_settings, rtol, slack) -> CheckResult:
    if not isinstance(results, Mapping) or len(results) < min_settings:
        return CheckResult(name, False, f"try at least {min_settings} values of the {setting}; got "
                                        f"{len(results) if isinstance(results, Mapping) else _short(results)}")
    table = []
    for key in sorted(results):
        reported = _as_metrics(results[key])
        try:
            measured = _as_metrics(recompute(key))
        except Exception as error:  # noqa: BLE001 - a learner's output that cannot be measured
            return CheckResult(name, False, f"{setting} {key}: your outputs could not be measured again: "
                                            f"{type(error).__name__}: {error}")
        for metric, value in measured.items():
            if metric not in reported:
                return CheckResult(name, False, f"{setting} {key}: report {metric!r} too (got {sorted(reported)})")
            mine = reported[metric]
            if not isinstance(mine, (int, float)) or isinstance(mine, bool) or mine != mine:
                return CheckResult(name, False, f"{setting} {key}: {metric} must be a number, got {_short(mine)}")
            if abs(mine - value) > rtol * abs(value) + 1e-12:
                return CheckResult(name, False, f"{setting} {key}: you report {metric} = {mine:.6g}, but your "
                                                f"own outputs give {value:.6g}: report what your code measured")
        table.append((key, measured))
    for metric, direction in trends.items():
        sign = TRENDS[direction]
        for (a, low), (b, high) in zip(table, table[1:]):
            if sign * (high[metric] - low[metric]) < -slack * abs(low[metric]):
                return CheckResult(name, False, f"{metric} should be {direction} in the {setting}, but "
                                                f"{setting} {a} gives {low[metric]:.4g} and {b} gives {high[metric]:.4g}")
    shown = "; ".join(f"{k}: " + ", ".join(f"{m} {v:.4g}" for m, v in ms.items()) for k, ms in table)
    ordered = f", {', '.join(f'{m} {d}' for m, d in trends.items())} as theory says" if trends else ""
    return CheckResult(name, True, f"{len(table)} settings, each result recomputed from your outputs{ordered}."
                                   f"\n   {shown}")


# ----------------------------------------------------------------------------- chapter 00

def check_bytes_at_precision(learner_fn: Callable[[int, float], float]) -> CheckResult:
    """Chapter 00: bytes to store n parameters at a given number of bits."""
    from .models import bytes_at_precision

    cases = [((n, bits), {}, float(bytes_at_precision(n, bits)))
             for n, bits in [(1, 32), (134_515_008, 32), (134_515_008, 16), (134_515_008, 8),
                             (1000, 4), (7_000_000_000, 4.5)]]
    return run_check("bytes_at_precision", learner_fn, cases)


# ----------------------------------------------------------------------------- chapter 06

def check_majority_vote(learner_fn: Callable) -> CheckResult:
    """Chapter 06: (most frequent answer, its share of all samples); None never wins; ties go to
    the answer seen first."""
    from .self_improve import majority_vote

    votes = [[7, 7, 8, 7], [3], [5, 4, 4, 5], [4, 5, 5, 4], [None, 9, 2, 2, 9], [None, None, None, 6],
             [None, None], [12, 11, 11, 12, 11]]
    return run_check("majority_vote", learner_fn, [((v,), {}, majority_vote(v)) for v in votes])


def check_extract_answer(learner_fn: Callable) -> CheckResult:
    """Chapter 06: the number a chatty reply gives as its answer (None when it gives none)."""
    from .self_improve import extract_answer

    replies = ["15", "4 + 7 = 11", "The answer is 12.", "The answer is 2 + 1 = 3.",
               "19 + 17 = 26\n\nThis is a classic example of a mathematical identity",
               "To solve this problem, we need to find the sum of 9 and 4.\n\nThe answer is 18.",
               "To solve this problem, we need to find the sum of 8 and 3. First, we add 8 to 3, which gives us 11.",
               "To add 5 and 6, you simply add them together.", "The sum of 3 and 5 is **8**."]
    return run_check("extract_answer", learner_fn, [((r,), {}, extract_answer(r)) for r in replies])


# ----------------------------------------------------------------------------- chapter 03

def check_sft_labels(learner_fn: Callable) -> CheckResult:
    """Chapter 03: labels = input ids, with the prompt tokens and the padding set to -100."""
    from .train import response_labels

    ids = torch.tensor([[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 0, 0], [31, 32, 33, 34, 35, 36]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    cases = [((ids, lengths, attention), {}, response_labels(ids, lengths, attention))
             for lengths in ([2, 3, 0], [4, 1, 6], [1, 4, 5])]
    return run_check("sft_labels", learner_fn, cases)


def _tiny_llama(vocab_size: int = 64, seed: int = 0, pad_token_id: int = 0):
    """A 2-layer Llama with random weights, made on a forked random stream: a model a training
    step can be checked on in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .runtime import seeded

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id)
    with seeded(seed):
        return LlamaForCausalLM(config).eval()


def check_temperature_experiment(first_logits: torch.Tensor, results: Mapping, samples: Mapping) -> CheckResult:
    """Chapter 03, open experiment: the teacher writing at several temperatures. Per temperature T,
    the entropy (nats) of its first-token distribution softmax(logits / T) — which rises with T — and
    the share of distinct answers among the learner's own samples at T."""
    def recompute(temperature):
        if not temperature > 0:
            raise ValueError("sampling temperatures must be > 0 (greedy decoding is the limit T → 0)")
        log_p = torch.log_softmax(first_logits.double() / temperature, dim=-1)
        answers = list(samples[temperature])
        return {"entropy": float(-(log_p.exp() * log_p).sum()), "distinct share": len(set(answers)) / len(answers)}

    return check_experiment("temperature experiment", results, recompute, "temperature", {"entropy": "increasing"},
                            slack=1e-6, why="dividing the logits by a larger T flattens the softmax")


# ----------------------------------------------------------------------------- chapter 04

def _kl_cases(reference: Callable) -> list[tuple[tuple, dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    cases = []
    for rows, vocab, temperature in [(1, 4, 1.0), (5, 10, 1.0), (5, 10, 2.0), (3, 50, 0.5), (7, 8, 4.0)]:
        student, teacher = torch.randn(rows, vocab, generator=g) * 3, torch.randn(rows, vocab, generator=g) * 3
        cases.append(((student, teacher, temperature), {}, reference(student, teacher, temperature)))
    return cases


def _check_kl(name: str, learner_fn: Callable, reference: Callable, mirror: Callable) -> CheckResult:
    """Compare with `reference`; when the learner's values match `mirror` instead, say so."""
    result = _run_cases(name, learner_fn, _kl_cases(reference), 1e-5, 1e-4)
    if not result.passed and _run_cases(name, learner_fn, _kl_cases(mirror), 1e-5, 1e-4).passed:
        result.details += ("\n   your values are the other direction of the KL: swap which distribution "
                           "weights the log-ratio")
    elif not result.passed and _run_cases(name, learner_fn, [
            (args, kw, reference(*args[:2], 1.0)) for args, kw, _ in _kl_cases(reference)[2:3]], 1e-5, 1e-4).passed:
        result.details += "\n   your values ignore the temperature: divide both logits by it before the softmax"
    return report(result)


def check_forward_kl(learner_fn: Callable) -> CheckResult:
    """Chapter 04: mean over rows of KL(p_T || p_S), both softened by the temperature."""
    from .distill import forward_kl, reverse_kl

    return _check_kl("forward_kl", learner_fn, forward_kl, reverse_kl)


def check_reverse_kl(learner_fn: Callable) -> CheckResult:
    """Chapter 04: mean over rows of KL(p_S || p_T), both softened by the temperature."""
    from .distill import forward_kl, reverse_kl

    return _check_kl("reverse_kl", learner_fn, reverse_kl, forward_kl)


# ----------------------------------------------------------------------------- chapter 01

def _quantization_inputs() -> list[torch.Tensor]:
    """The slide's 3x3 matrix, a wider random one, and an all-positive one (zero-point's case)."""
    g = torch.Generator().manual_seed(1)
    slide = torch.tensor([[0.34, 3.75, 5.64], [1.12, 2.7, -0.9], [-4.7, 0.68, 1.43]])
    return [slide, torch.randn(4, 16, generator=g) * 2, torch.rand(3, 8, generator=g) * 5 + 1]


def _check_quantized(name: str, learner_fn: Callable, cases: list, hint: str = "") -> CheckResult:
    """Compare values; then insist that q is stored as int8 (one byte per value is the point)."""
    result = _run_cases(name, learner_fn, cases, 1e-6, 1e-5)
    if result.passed:
        args, kwargs, _ = cases[0]
        q = learner_fn(*args, **kwargs)[0]
        if q.dtype != torch.int8:
            result = CheckResult(name, False, f"the values are right, but q is {q.dtype}: store it as "
                                              "torch.int8 (q.to(torch.int8)), one byte per value")
    elif hint:
        result.details += f"\n   hint: {hint}"
    return report(result)


def check_absmax_quantize(learner_fn: Callable) -> CheckResult:
    """Chapter 01: (q, scale), q = round(qmax / max|x| · x), qmax = 2^(bits−1) − 1, scale = max|x| / qmax."""
    from .quant import absmax_quantize

    cases = [((x,), {"bits": bits}, absmax_quantize(x, bits)) for x in _quantization_inputs() for bits in (8, 4)]
    return _check_quantized("absmax_quantize", learner_fn, cases,
                            "qmax is 127 for 8 bits and 7 for 4 bits; the largest |x| must map to ±qmax")


def check_zeropoint_quantize(learner_fn: Callable) -> CheckResult:
    """Chapter 01: (q, scale, zero_point) with scale = (max − min)/(2^b − 1),
    zero_point = round(−min/scale) − 2^(b−1), q = clamp(round(x/scale) + zero_point, −2^(b−1), 2^(b−1) − 1)."""
    from .quant import zeropoint_quantize

    cases = [((x,), {"bits": bits}, zeropoint_quantize(x, bits)) for x in _quantization_inputs() for bits in (8, 4)]
    return _check_quantized("zeropoint_quantize", learner_fn, cases,
                            "the smallest value must map to −2^(bits−1) and the largest to 2^(bits−1) − 1")


def check_group_quantize(learner_fn: Callable) -> CheckResult:
    """Chapter 01: absmax per group of `group_size` consecutive values along the last dimension;
    scale has one value per group, shape [..., n // group_size]."""
    from .quant import absmax_quantize

    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(4, 16, generator=g), 4, 8), (torch.randn(4, 16, generator=g) * 3, 8, 8),
              (torch.randn(2, 3, 32, generator=g), 16, 4)]
    cases = [((x, group), {"bits": bits}, absmax_quantize(x, bits, group_size=group)) for x, group, bits in inputs]
    return _check_quantized("group_quantize", learner_fn, cases,
                            "view x as [..., n // group_size, group_size] and take the max over the last axis")


def check_group_size_experiment(weight: torch.Tensor, results: Mapping, reconstructed: Mapping,
                                 bits: int) -> CheckResult:
    """Chapter 01, open experiment: per-group absmax at the group sizes the learner chose. Each
    reported error must be ‖W − Ŵ‖/‖W‖ of the learner's own reconstruction Ŵ, and bits/weight
    bits + 32/g (a float32 scale per g weights); the error may not fall as groups grow."""
    from .quant import relative_error

    def recompute(group_size):
        return {"bits/weight": bits + 32 / group_size, "error": relative_error(weight, reconstructed[group_size])}

    return check_experiment("group size experiment", results, recompute, "group size",
                            {"error": "increasing", "bits/weight": "decreasing"}, slack=0.01,
                            why="a larger group shares its scale with more weights, so its largest |w| (and "
                                "the step) can only grow; the error follows, up to rounding luck")


def check_dequantize(learner_fn: Callable) -> CheckResult:
    """Chapter 01: x̂ = q · scale, or (q − zero_point) · scale, per tensor, per channel or per group."""
    from .quant import absmax_quantize, dequantize, zeropoint_quantize

    slide, wide, positive = _quantization_inputs()
    quantized = [absmax_quantize(slide), absmax_quantize(wide, 4, dim=-1), zeropoint_quantize(positive),
                 zeropoint_quantize(wide, 8, dim=0), absmax_quantize(wide, 8, group_size=4),
                 zeropoint_quantize(wide, 4, group_size=8)]
    cases = [(tuple(parts), {}, dequantize(*parts)) for parts in quantized]
    result = _run_cases("dequantize", learner_fn, cases, 1e-6, 1e-5)
    if not result.passed:
        result.details += ("\n   hint: subtract zero_point (when given) before scaling; a per-group scale has "
                           "n // group_size values in its last axis: repeat each one group_size times "
                           "(torch.repeat_interleave) before multiplying")
    return report(result)


# ----------------------------------------------------------------------------- chapter 02

def check_w8a16_forward(learner_fn: Callable) -> CheckResult:
    """Chapter 02: y = x @ (W_q · s_w)^T + b for an Int8Linear in mode "w8a16"."""
    from torch import nn

    from .int8_inference import Int8Linear
    from .runtime import seeded

    cases = []
    with seeded(3):  # the same layers every time, and the learner's random stream left alone
        for (k, n, bias, granularity, shape) in [(16, 8, True, "channel", (3, 16)), (16, 8, False, "channel", (2, 5, 16)),
                                                  (32, 12, True, "tensor", (4, 32))]:
            layer = Int8Linear.from_float(nn.Linear(k, n, bias=bias), "w8a16", granularity)
            x = torch.randn(shape)
            with torch.no_grad():
                cases.append(((layer, x), {}, layer(x)))
    result = _run_cases("w8a16_forward", learner_fn, cases, 1e-5, 1e-4)
    if not result.passed:
        unscaled = [((layer, x), {}, torch.nn.functional.linear(x, layer.weight.float(), layer.bias))
                    for (layer, x), _, _ in cases]
        if _run_cases("w8a16_forward", learner_fn, unscaled, 1e-5, 1e-4).passed:
            result.details += "\n   hint: the INT8 weights need their scale: W ≈ weight · weight_scale"
    return report(result)


def check_w8a8_forward(learner_fn: Callable) -> CheckResult:
    """Chapter 02: W8A8 by hand. Each row (token) of x absmax-quantized to INT8, an INT8 × INT8 matmul
    with int32 sums, dequantized by s_x ⊗ s_w, plus the bias: y = (X_q @ W_qᵀ) · (s_x ⊗ s_w) + b."""
    from torch import nn

    from .int8_inference import Int8Linear
    from .runtime import seeded

    layers, cases = [], []
    with seeded(8):  # the same layers every time, and the learner's random stream left alone
        for (k, n, bias, shape, spike) in [(16, 8, True, (3, 16), 1.0), (32, 12, False, (2, 5, 32), 1.0),
                                           (32, 8, True, (6, 32), 40.0)]:
            layer = Int8Linear.from_float(nn.Linear(k, n, bias=bias), "w8a8")
            x = torch.randn(shape)
            x[..., 0, 3] *= spike  # one token with a large feature: per-token scales matter
            with torch.no_grad():
                cases.append(((layer, x), {}, layer(x)))
            layers.append(layer)
    result = _run_cases("w8a8_forward", learner_fn, cases, 1e-5, 1e-4)
    if not result.passed:
        def per_tensor(layer, x):
            rows = x.reshape(-1, layer.in_features)
            s_x = rows.abs().max() / 127
            y = torch.round(rows / s_x) @ layer.weight.float().t() * s_x * layer.weight_scale.view(1, -1)
            return (y if layer.bias is None else y + layer.bias).view(*x.shape[:-1], -1)

        def unscaled(layer, x):
            return torch.nn.functional.linear(x, layer.weight.float(), layer.bias)

        for wrong, hint in [(per_tensor, "one scale per token (row of x, max over its features), not one "
                                         "for the whole tensor"),
                            (unscaled, "quantize x, and multiply the int32 sums by s_x ⊗ s_w")]:
            near = [(args, kw, wrong(*args)) for args, kw, _ in cases]
            if _run_cases("w8a8_forward", learner_fn, near, 1e-5, 1e-4).passed:
                result.details += f"\n   hint: {hint}"
                break
    return report(result)


def check_smoothing_experiment(x: torch.Tensor, weight: torch.Tensor, results: Mapping,
                               smoothed: Mapping) -> CheckResult:
    """Chapter 02, open experiment: SmoothQuant's α. smoothed[α] = (X/s, W·s), the learner's own;
    it must still compute X·Wᵀ. Recomputed per α: the spread (largest / median per-input-channel
    max |·|) of activations and weights, and the W8A8 error (per token × per channel INT8) of
    the product. With s_j = max|X_j|^α / max|W_j|^(1−α) the activation spread falls and the weight
    spread grows with α, exactly; where the error is lowest is the experiment's finding."""
    from .quant import fake_quantize, relative_error

    exact = x.double() @ weight.double().t()

    def spread(t: torch.Tensor) -> float:
        channel_max = t.abs().reshape(-1, t.shape[-1]).amax(dim=0)
        return float(channel_max.max() / channel_max.median())

    def recompute(alpha):
        x_s, w_s = smoothed[alpha]
        gap = float((x_s.double() @ w_s.double().t() - exact).norm() / exact.norm())
        if gap > 1e-4:
            raise ValueError(f"(X/s)·(W·s)ᵀ differs from X·Wᵀ by {gap:.2g} (relative): divide X's input "
                             f"channels by s and multiply W's by the same s")
        y = fake_quantize(x_s, 8, dim=-1) @ fake_quantize(w_s, 8, dim=-1).t()
        return {"activation spread": spread(x_s), "weight spread": spread(w_s),
                "W8A8 error": relative_error(exact.float(), y)}

    return check_experiment("SmoothQuant alpha experiment", results, recompute, "alpha",
                            {"activation spread": "decreasing", "weight spread": "increasing"}, slack=1e-3,
                            why="after smoothing, channel j's activation max is (max|X_j|·max|W_j|)^(1−α) "
                                "and its weight max is the same product to the power α")


# ----------------------------------------------------------------------------- chapter 07

def check_smallest_within(learner_fn: Callable) -> CheckResult:
    """Chapter 07: the smallest stair within a tolerance of the reference's metric."""
    from .staircase import smallest_within

    table = [{"stair": name, "weights (MiB)": mib, "ppl": ppl}
             for name, mib, ppl in [("big", 500.0, 3.0), ("big-int8", 200.0, 3.1),
                                    ("small", 190.0, 9.0), ("small-int8", 130.0, 9.5)]]
    cases = [((table, "ppl", ref, tol), {}, smallest_within(table, "ppl", ref, tol))
             for ref, tol in [("big", 0.0), ("big", 0.05), ("big", 2.0), ("big", 5.0), ("small", 0.1)]]
    result = _run_cases("smallest_within", learner_fn, cases, 1e-9, 0.0)
    if result:
        for bad in [{"reference": "nope", "tolerance": 0.1}, {"reference": "big", "tolerance": -1.0}]:
            try:
                learner_fn(table, "ppl", bad["reference"], bad["tolerance"])
            except ValueError:
                continue
            except Exception as error:  # noqa: BLE001 - reported to the learner
                result = CheckResult("smallest_within", False, f"with {bad}: expected ValueError, "
                                                               f"got {type(error).__name__}: {error}")
                break
            result = CheckResult("smallest_within", False, f"with {bad}: expected a ValueError, got no error")
            break
    return report(result)


# ----------------------------------------------------------------------------- chapter 05

def _feedback_cases(fn: Callable, n_args: int, **kwargs) -> list[tuple[tuple, dict, Any]]:
    """Fixed inputs (rewards / log-probs, some large) and course_lib's answers for them."""
    gen = torch.Generator().manual_seed(5)
    cases = []
    for size, scale in [(1, 1.0), (6, 1.0), (8, 100.0)]:
        args = tuple(torch.randn(size, generator=gen) * scale for _ in range(n_args))
        cases.append((args, kwargs, fn(*args, **kwargs)))
    return cases


def check_bradley_terry_loss(learner_fn: Callable) -> CheckResult:
    """Chapter 05: the Bradley–Terry loss, mean of −log σ(r_chosen − r_rejected)."""
    from .reward_model import bradley_terry_loss

    cases = _feedback_cases(bradley_terry_loss, 2)
    cases.append(((torch.zeros(3), torch.zeros(3)), {}, bradley_terry_loss(torch.zeros(3), torch.zeros(3))))
    result = _run_cases("bradley_terry_loss", learner_fn, cases, 1e-5, 1e-5)
    if not result and _run_cases("bradley_terry_loss", learner_fn, cases[:2], 1e-5, 1e-5).passed:
        result.details += "\n   hint: large rewards overflow exp(); F.logsigmoid stays finite"
    return report(result)


def check_dpo_loss(learner_fn: Callable) -> CheckResult:
    """Chapter 05: the DPO loss (sigmoid form) with its β."""
    from .dpo import dpo_loss

    cases = _feedback_cases(dpo_loss, 4) + _feedback_cases(dpo_loss, 4, beta=0.5)
    result = _run_cases("dpo_loss", learner_fn, cases, 1e-5, 1e-5)
    if not result and _run_cases("dpo_loss", learner_fn, cases[:3], 1e-5, 1e-5).passed:
        result.details += "\n   hint: the default case passes; is beta used, not a fixed 0.1?"
    return report(result)


def check_average_orders(learner_fn: Callable) -> CheckResult:
    """Chapter 05: P(first better) from a judge asked in both orders."""
    from .judge import average_orders

    pairs = [(torch.tensor([0.8, 0.8, 0.5]), torch.tensor([0.8, 0.2, 0.5])),
             (torch.tensor([0.9, 0.3, 0.6, 0.1]), torch.tensor([0.7, 0.6, 0.2, 0.95]))]
    cases = [((a, b), {}, average_orders(a, b)) for a, b in pairs]
    result = _run_cases("average_orders", learner_fn, cases, 1e-6, 1e-5)
    naive = [((a, b), {}, (a + b) / 2) for a, b in pairs]
    if not result and _run_cases("average_orders", learner_fn, naive, 1e-6, 1e-5).passed:
        result.details += ("\n   hint: in the swapped order the first response is shown as B, so its "
                           "probability is 1 − P(A)")
    return report(result)


# ----------------------------------------------------------------------------- write the loop (03-06)

def _trainable(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def _learner_call(name: str, context: str, fn: Callable, *args, **kwargs) -> tuple[Any, CheckResult | None]:
    """(fn(*args, **kwargs), None), or (None, a failed CheckResult) when the learner's code raised:
    an unfinished stub is named, any other error shown with its line."""
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        return None, CheckResult(name, False, "the function still raises NotImplementedError: "
                                              "replace `# YOUR CODE HERE` with your code")
    except Exception as error:  # a learner's bug: show where, briefly
        where = traceback.extract_tb(error.__traceback__)[-1]
        return None, CheckResult(name, False, f"{context}: {type(error).__name__}: {error} "
                                              f"(line {where.lineno}: {where.line})")


def _two_steps(step_fn: Callable, model, batch: dict, kwargs: dict, lr: float) -> dict[str, Any]:
    """Two calls of `step_fn(model, batch, optimizer, **kwargs)` with one plain SGD optimizer: the
    two losses it returned and the trainable parameters before, after one and after two steps."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    seen = {"start": _trainable(model)}
    for step in (1, 2):
        loss = step_fn(model, {k: v.clone() for k, v in batch.items()}, optimizer, **kwargs)
        if loss is None:
            raise TypeError("the step returned None: return the loss (a number or a 0-d tensor)")
        loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        seen[f"loss {step}"], seen[f"after {step}"] = float(loss), _trainable(model)
    return seen


def _check_training_step(name: str, learner_fn: Callable, reference_fn: Callable, cases: list,
                         lr: float = 0.5, mistakes: Sequence[tuple[Callable, str]] = ()) -> CheckResult:
    """Run the learner's step and the reference step twice each from the same model on each case
    (make_model, batch, kwargs); say which of loss, update and second step first differs.
    `mistakes` are (wrong step, hint): the hint of the first wrong step that agrees with the
    learner's on everything up to and including what differs."""
    if not callable(learner_fn):
        return report(CheckResult(name, False, f"expected a function, got {_short(learner_fn)}"))
    for make_model, batch, kwargs in cases:
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        where = f"({setting}) " if setting else ""
        expected = _two_steps(reference_fn, make_model(), batch, kwargs, lr)
        actual, failed = _learner_call(name, f"with {kwargs}" if kwargs else "a step raised",
                                       _two_steps, learner_fn, make_model(), batch, kwargs, lr)
        if failed is not None:
            return report(failed)

        def hint(keys: Sequence[str], atol: float, otherwise: str = "") -> str:
            for wrong, text in mistakes:
                seen = _two_steps(wrong, make_model(), batch, kwargs, lr)
                if describe_difference([actual[k] for k in keys], [seen[k] for k in keys], atol, 1e-4) is None:
                    return f"\n   hint: {text}"
            return otherwise

        if (why := describe_difference(actual["loss 1"], expected["loss 1"], 1e-5, 1e-4)) is not None:
            return report(CheckResult(name, False, f"{where}the loss of the first step: {why}"
                                                   + hint(["loss 1"], 1e-5)))
        if describe_difference(actual["after 1"], actual["start"], 0.0, 0.0) is None:
            return report(CheckResult(name, False, f"{where}the loss is right but the weights did not move: "
                                                   "call loss.backward() and optimizer.step()"))
        if (why := describe_difference(actual["after 1"], expected["after 1"], 1e-6, 1e-4)) is not None:
            return report(CheckResult(name, False, f"{where}the weights after one step: {why}" + hint(
                ["loss 1", "after 1"], 1e-6, "; the gradient is not that of the loss returned")))
        keys = ["loss 2", "after 2"]
        if (why := describe_difference([actual[k] for k in keys], [expected[k] for k in keys], 1e-5, 1e-4)) is not None:
            return report(CheckResult(name, False, f"{where}the first step is right, the second is not ({why})" + hint(
                ["loss 1", "after 1", *keys], 1e-5, ": clear the gradients each step (optimizer.zero_grad())")))
    return report(CheckResult(name, True, f"{len(cases)} settings x 2 steps: the losses and the updated "
                                          "weights match course_lib's"))


def _right_padded_batch(ids: torch.Tensor, lengths: Sequence[int], prompt: int = 4) -> dict[str, torch.Tensor]:
    """Rows of `ids` cut to `lengths` (padding 0 after them), labels on the tokens after `prompt`."""
    attention = (torch.arange(ids.shape[1]) < torch.tensor(list(lengths)).unsqueeze(1)).long()
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids.masked_fill(attention == 0, 0), "attention_mask": attention, "labels": labels}


def _sgd_step(loss_fn: Callable, max_grad_norm: float | None = None) -> Callable:
    """`step(model, batch, optimizer, **settings)`: the loss, backward, the gradient norm clipped
    to `max_grad_norm` (None: not clipped), step, gradients cleared."""
    def step(model, batch, optimizer, **settings):
        loss = loss_fn(model, batch, **settings)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


def _sft_step_cases() -> list:
    """A tiny Llama and two SFT batches (prompts of 3 and 5 tokens, rows right-padded)."""
    from .runtime import seeded

    with seeded(9):
        ids = torch.randint(1, 64, (3, 10))
    return [(lambda: _tiny_llama(seed=9), _right_padded_batch(ids, lengths, prompt), {})
            for lengths, prompt in (([10, 8, 10], 3), ([10, 10, 7], 5))]


def _unshifted_loss(model, batch: dict) -> torch.Tensor:
    """The mistake the SFT check names: the logits at t scored against the label at t, not t + 1."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def check_sft_step(learner_fn: Callable) -> CheckResult:
    """Chapter 03, the training loop by hand: `learner_fn(model, batch, optimizer)` does one step of
    `course_lib.train.train` with `lm_loss` (next-token cross-entropy of the label tokens, backward,
    gradient norm clipped to `train`'s max_grad_norm, the optimizer's step, gradients zeroed) and
    returns the loss. Two steps on each of two batches: the losses and every parameter afterwards."""
    import inspect

    from .train import lm_loss, train

    clip = inspect.signature(train).parameters["max_grad_norm"].default
    return _check_training_step("sft_step", learner_fn, _sgd_step(lm_loss, clip), _sft_step_cases(), mistakes=[
        (_sgd_step(_unshifted_loss, clip),
         "the logits at position t predict the token at t + 1: drop the last logit and the first label"),
        (_sgd_step(lm_loss), f"clip the gradient norm to {clip} (torch.nn.utils.clip_grad_norm_) before the step")])


def _kd_step_cases() -> list:
    """A tiny student and a batch of 3 rows (prompt 4 tokens, one row padded) carrying teacher logits."""
    from .runtime import seeded
    from .scoring import response_mask

    with seeded(4):
        batch = _right_padded_batch(torch.randint(1, 64, (3, 10)), [10, 10, 7])
        batch["teacher_logits"] = torch.randn(int(response_mask(batch).sum()), 64) * 3
    return [(lambda: _tiny_llama(seed=1), batch, {"temperature": t}) for t in (1.0, 2.0)]


def _kd_step(divergence: str) -> Callable:
    from .distill import token_kd_loss

    return _sgd_step(lambda student, batch, temperature=1.0:
                     token_kd_loss(divergence, temperature=temperature)(student, batch))


def check_distillation_step(learner_fn: Callable) -> CheckResult:
    """Chapter 04: one step of white-box distillation, `step(student, batch, optimizer, temperature)`:
    forward KL(p_T ‖ p_S) at the response positions against `batch["teacher_logits"]`, backward,
    optimizer step, gradients cleared; returns the loss (`distill.token_kd_loss("forward_kl")`)."""
    return _check_training_step("distillation_step", learner_fn, _kd_step("forward_kl"), _kd_step_cases(), mistakes=[
        (_kd_step("reverse_kl"), "that is the reverse KL: the teacher's distribution weights the log-ratio"),
        (lambda m, b, o, temperature=1.0: _kd_step("forward_kl")(m, b, o, temperature=1.0),
         "the loss ignores the temperature: divide both logits by it")])


def _dpo_step_cases() -> list:
    """A tiny LoRA policy (B randomized, so it differs from its reference) and 2 preference pairs:
    rows 0-1 the chosen answers, rows 2-3 the rejected ones, with the reference log-probs."""
    from .dpo import add_reference_logprobs
    from .runtime import seeded
    from .train import add_lora

    with seeded(5):
        ids = torch.cat([torch.randint(1, 64, (2, 4)).repeat(2, 1), torch.randint(1, 64, (4, 5))], dim=1)
        batch = _right_padded_batch(ids, [9, 7, 8, 9])

    def make_policy():
        with seeded(6), torch.no_grad():
            policy = add_lora(_tiny_llama(seed=2), r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        return policy

    scored = dict(batch)
    add_reference_logprobs(make_policy(), [scored])
    return [(make_policy, scored, {"beta": beta}) for beta in (0.1, 0.5)]


def _dpo_step(swap: bool = False, beta_fixed: float | None = None) -> Callable:
    from .dpo import dpo_batch_loss

    def loss(policy, batch, beta=0.1):
        if swap:
            half = len(batch["input_ids"]) // 2
            batch = {k: torch.cat([v[half:], v[:half]]) for k, v in batch.items()}
        return dpo_batch_loss(policy, batch, beta if beta_fixed is None else beta_fixed)

    return _sgd_step(loss)


def check_dpo_step(learner_fn: Callable) -> CheckResult:
    """Chapter 05: one DPO step, `step(policy, batch, optimizer, beta)`: log π of each row
    (`sequence_logprobs`), chosen = first half, rejected = second half, the reference's from
    `batch["ref_logps"]`, the DPO loss, backward, step, gradients cleared (`dpo.dpo_batch_loss`)."""
    return _check_training_step("dpo_step", learner_fn, _dpo_step(), _dpo_step_cases(), lr=0.2, mistakes=[
        (_dpo_step(swap=True), "chosen and rejected are swapped: the chosen answers are the batch's first half"),
        (_dpo_step(beta_fixed=0.1), "is beta used, not a fixed 0.1?")])


# ----------------------------------------------------------------------------- chapter 06: the LMSI round

def _lmsi_case():
    """Four addition questions with 4 chatty samples each: a clear vote, a 2-2 tie, a confident
    wrong vote, and a question answered by one sample of four."""
    from .self_improve import Question, Samples, extract_answer

    questions = [Question(f"What is {a} plus {b}? Answer with the number.", a + b, (a, b))
                 for a, b in [(2, 3), (4, 4), (6, 7), (9, 1)]]
    replies = [["2 + 3 = 5\n\nThis is a classic sum.", "The answer is 5.", "5", "2 + 3 = 6"],
               ["4 + 4 = 8", "The sum is 9.", "8", "It is 9, a classic."],
               ["6 + 7 = 12", "The answer is 12.", "12", "6 plus 7 equals 12."],
               ["To add 9 and 1, add them.", "9 + 1 = 10", "I cannot say.", "Let me think."]]
    return questions, Samples(replies, [[extract_answer(r) for r in row] for row in replies])


def check_lmsi_round(learner_fn: Callable, tokenizer) -> CheckResult:
    """Chapter 06: `lmsi_round(model, tokenizer, questions, samples, threshold, steps, lr, batch_size,
    seed)` returns (examples, TrainResult): the LMSI filter (`self_improve.confident_examples`) and
    the training on them (`training_batches`, `train` with `lm_loss`), checked on a tiny model."""
    from .self_improve import confident_examples, training_batches
    from .train import lm_loss, train

    name = "lmsi_round"
    if not callable(learner_fn):
        return report(CheckResult(name, False, f"expected a function, got {_short(learner_fn)}"))
    questions, samples = _lmsi_case()
    settings = dict(steps=2, lr=1e-2, batch_size=2, seed=3)
    for threshold in (0.5, 0.75, 1.0):
        expected_examples = confident_examples(questions, samples, threshold)
        model = _tiny_llama(len(tokenizer), seed=7, pad_token_id=tokenizer.pad_token_id)
        expected = train(model, lm_loss, training_batches(tokenizer, expected_examples, settings["batch_size"],
                                                          settings["seed"]),
                         settings["steps"], lr=settings["lr"], seed=settings["seed"], progress=False)
        mine = _tiny_llama(len(tokenizer), seed=7, pad_token_id=tokenizer.pad_token_id)
        out, failed = _learner_call(name, f"threshold {threshold}", learner_fn, mine, tokenizer, questions, samples,
                                    threshold, **settings)
        if failed is not None:
            return report(failed)
        if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "losses")):
            return report(CheckResult(name, False, f"return (examples, the TrainResult of train()), got {_short(out)}"))
        examples, run = out
        if list(examples) != expected_examples:
            hint = ("a reply that reaches the voted answer is kept cut after its answer "
                    "(self_improve.reply_up_to_answer), the others are left out; a question counts when "
                    "its vote's confidence is >= the threshold")
            return report(CheckResult(name, False, f"threshold {threshold}: {len(examples)} examples, expected "
                                                   f"{len(expected_examples)}: {describe_difference(list(examples), expected_examples)}"
                                                   f"\n   hint: {hint}"))
        why = describe_difference((torch.tensor(run.losses), _trainable(mine)),
                                  (torch.tensor(expected.losses), _trainable(model)), 1e-5, 1e-4)
        if why is not None:
            return report(CheckResult(name, False, f"threshold {threshold}: the examples are right, the training "
                                                   f"is not ({why}); use training_batches(tokenizer, examples, "
                                                   "batch_size, seed) and train(model, lm_loss, ..., seed=seed)"))
    return report(CheckResult(name, True, "3 thresholds: the kept examples, the losses and the trained weights match"))


# ----------------------------------------------------------------------------- open experiments (04-06)
# The learner chooses the settings; the check recomputes what it can from what the learner kept and
# validates the table for consistency (and the bounds the theory gives), never for a fixed value.

def _sweep_table(sweep: dict, columns: Sequence[str], key: str) -> str:
    rows = [f"{key:>9s} " + " ".join(f"{c:>12s}" for c in columns)]
    for setting, row in sorted(sweep.items()):
        rows.append(f"{setting:9.3g} " + " ".join(f"{_cell(row[c]):>12s}" for c in columns))
    return "\n   ".join(rows)


def _cell(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}/{value[1]}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _sweep_shape(name: str, sweep: Any, fields: Sequence[str], what: str) -> CheckResult | None:
    """A failed CheckResult unless `sweep` maps at least three settings in [0, 1] to dicts with `fields`."""
    if not isinstance(sweep, dict) or len(sweep) < 3:
        return CheckResult(name, False, f"expected a dict of at least three {what} -> results, got {_short(sweep)}")
    for setting, row in sweep.items():
        if not isinstance(setting, (int, float)) or not 0 <= setting <= 1:
            return CheckResult(name, False, f"each {what[:-1]} must be a number in [0, 1], got {setting!r}")
        if not isinstance(row, dict) or any(f not in row for f in fields):
            return CheckResult(name, False, f"{what[:-1]} {setting}: expected a dict with {list(fields)}, got {_short(row)}")
    return None


def check_jsd_sweep(sweep: dict, teacher_logits: torch.Tensor, picks_from: float | None) -> CheckResult:
    """Chapter 04's open experiment: {β: {"student": fitted logits, "jsd": JSD_β at the end,
    "one_side": the student's mass on its heavier half of the bins}} and `picks_from`, the smallest β
    of the sweep with one_side > 0.9 (None if none). Each number is recomputed from the student's
    logits; JSD_β must respect its bound H(β) = −β ln β − (1−β) ln(1−β) ≤ ln 2."""
    from .distill import generalized_jsd

    name = "jsd_sweep"
    if (failed := _sweep_shape(name, sweep, ("student", "jsd", "one_side"), "betas")) is not None:
        return report(failed)
    half = teacher_logits.shape[-1] // 2
    for beta, row in sorted(sweep.items()):
        student = row["student"]
        if not isinstance(student, torch.Tensor) or student.shape != teacher_logits.shape:
            return report(CheckResult(name, False, f"β={beta}: 'student' must be the fitted logits, shape "
                                                   f"{tuple(teacher_logits.shape)}, got {_short(student)}"))
        jsd = float(generalized_jsd(student.detach()[None], teacher_logits[None], beta=beta))
        p = torch.softmax(student.detach().double(), -1)
        one_side = float(max(p[:half].sum(), p[half:].sum()))
        for field_name, value in (("jsd", jsd), ("one_side", one_side)):
            if (why := describe_difference(row[field_name], value, 1e-4, 1e-3)) is not None:
                return report(CheckResult(name, False, f"β={beta}: your {field_name!r} is not that of your student "
                                                       f"({why})"))
        bound = 0.0 if beta in (0, 1) else -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        if 0 < beta < 1 and jsd > bound + 1e-6:
            return report(CheckResult(name, False, f"β={beta}: JSD {jsd:.4f} exceeds its bound H(β) = {bound:.4f}"))
    expected = next((b for b, row in sorted(sweep.items()) if row["one_side"] > 0.9), None)
    table = _sweep_table(sweep, ("jsd", "one_side"), "β")
    if picks_from != expected:
        return report(CheckResult(name, False, f"by your own table the student picks one mode (one_side > 0.9) "
                                               f"from β = {expected}, not {picks_from}:\n   {table}"))
    return report(CheckResult(name, True, f"{len(sweep)} betas, every number recomputed from your students, every "
                                          f"JSD within H(β) ≤ ln 2 = {math.log(2):.4f}; picks from β = {expected}\n   {table}"))


def check_noise_sweep(sweep: dict, pairs: Sequence, clean_labels: Sequence[int]) -> CheckResult:
    """Chapter 05's open experiment: {noise: {"labels": the annotator's labels, "agreement": (k, n)
    with the clean rubric, "rm_accuracy": (k, n) of a reward model trained on those labels}}. The
    flips (a share `noise` of the decided verdicts, ties untouched) and the agreement are
    recomputed; every reward model must be scored on the same held-out pairs."""
    from .preference_data import agreement

    name = "noise_sweep"
    if (failed := _sweep_shape(name, sweep, ("labels", "agreement", "rm_accuracy"), "noise levels")) is not None:
        return report(failed)
    decided = [i for i, y in enumerate(clean_labels) if y != 0]
    held_out = set()
    for noise, row in sorted(sweep.items()):
        labels = list(row["labels"])
        if len(labels) != len(pairs) or any(y not in (-1, 0, 1) for y in labels):
            return report(CheckResult(name, False, f"noise {noise}: 'labels' must be one label in (+1, 0, -1) "
                                                   f"per pair ({len(pairs)}), got {len(labels)}"))
        if any((y == 0) != (c == 0) for y, c in zip(labels, clean_labels)):
            return report(CheckResult(name, False, f"noise {noise}: the annotator only flips decided verdicts; "
                                                   "a tie must stay a tie (and no decided pair may become one)"))
        flips = sum(labels[i] != clean_labels[i] for i in decided)
        if flips != round(noise * len(decided)):
            return report(CheckResult(name, False, f"noise {noise}: {flips} of {len(decided)} verdicts flipped, "
                                                   f"expected round({noise} x {len(decided)}) = "
                                                   f"{round(noise * len(decided))} (rubric_labels(pairs, noise=...))"))
        if (why := describe_difference(tuple(row["agreement"]), agreement(labels, clean_labels))) is not None:
            return report(CheckResult(name, False, f"noise {noise}: 'agreement' is not your labels' agreement "
                                                   f"with the clean rubric ({why})"))
        k, n = row["rm_accuracy"]
        if not 0 <= k <= n or n == 0:
            return report(CheckResult(name, False, f"noise {noise}: 'rm_accuracy' must be (right, out of n > 0), "
                                                   f"got {row['rm_accuracy']}"))
        held_out.add(n)
    if len(held_out) > 1:
        return report(CheckResult(name, False, f"the reward models were scored on different numbers of held-out "
                                               f"pairs {sorted(held_out)}: compare them on the same ones"))
    return report(CheckResult(name, True, f"{len(sweep)} noise levels: flips, ties and agreement recomputed, every "
                                          f"reward model scored on the same {held_out.pop()} held-out pairs\n   "
                                          + _sweep_table(sweep, ("agreement", "rm_accuracy"), "noise")))


def check_threshold_sweep(sweep: dict, questions: Sequence, samples, chosen: float) -> CheckResult:
    """Chapter 06's open experiment: {threshold: {"kept": questions whose vote is that confident,
    "right": of those, how many votes are right, "examples": training replies kept}} on `samples`
    of `questions`, and the threshold the learner would train with (`chosen`, one of the sweep).
    Every count is recomputed (`self_improve.confident_examples`)."""
    from .self_improve import confident_examples

    name = "threshold_sweep"
    if (failed := _sweep_shape(name, sweep, ("kept", "right", "examples"), "thresholds")) is not None:
        return report(failed)
    votes = samples.votes()
    for threshold, row in sorted(sweep.items()):
        kept = [(q, v) for q, (v, c) in zip(questions, votes) if v is not None and c >= threshold]
        expected = {"kept": len(kept), "right": sum(v == q.answer for q, v in kept),
                    "examples": len(confident_examples(questions, samples, threshold))}
        wrong = [f"{k} {row[k]} (recomputed: {v})" for k, v in expected.items() if row[k] != v]
        if wrong:
            return report(CheckResult(name, False, f"threshold {threshold}: " + ", ".join(wrong)))
    if chosen not in sweep:
        return report(CheckResult(name, False, f"choose your threshold among the ones you measured "
                                               f"{sorted(sweep)}, got {chosen!r}"))
    table = _sweep_table({t: {**r, "precision": r["right"] / r["kept"] if r["kept"] else float("nan")}
                          for t, r in sweep.items()}, ("kept", "right", "precision", "examples"), "threshold")
    return report(CheckResult(name, True, f"{len(sweep)} thresholds, every count recomputed; you chose {chosen}\n   "
                                          + table))
