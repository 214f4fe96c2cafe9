"""Instant feedback for exercises: `check_<exercise>(learner_fn)` prints a verdict, never a traceback.

Each check runs the learner's function on small fixed inputs, compares with course_lib's own
implementation and says what differs: the first differing values and the largest difference.
"""
from __future__ import annotations

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
                     within: float | None = None, why: str = "") -> CheckResult:
    """Predict-then-run: the learner's `prediction`, written before the run, against the `outcome`
    the run measured. With `choices`, the prediction must be one of them and equal the outcome; with
    `within`, a number within a factor `within` of the measured one. `why` explains the outcome."""
    if choices is not None and prediction not in choices:
        return report(CheckResult(question, False, f"answer with one of {', '.join(map(repr, choices))}; "
                                                   f"got {_short(prediction)}"))
    if within is not None:
        if not isinstance(prediction, (int, float)) or isinstance(prediction, bool) or not prediction > 0:
            return report(CheckResult(question, False, f"predict a positive number, got {_short(prediction)}"))
        ratio = max(prediction / outcome, outcome / prediction)
        passed = ratio <= within
        told = f"you predicted {prediction:.4g}; the run measured {outcome:.4g} ({ratio:.2g}x off, within {within:g}x passes)"
    else:
        passed = prediction == outcome
        told = f"you predicted {prediction!r}; the run measured {outcome!r}"
    return report(CheckResult(question, passed, told + (f"\n   why: {why}" if why else "")))


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


def _tiny_llama():
    """A seeded two-layer Llama with a 64-token vocabulary: a training step runs in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .runtime import seeded

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    with seeded(9):
        return LlamaForCausalLM(config).eval()


def _sft_batches() -> list[dict]:
    from .train import response_labels

    g = torch.Generator().manual_seed(9)
    batches = []
    for lengths, kept in [([3, 5], [10, 8]), ([2, 4, 6], [10, 10, 7])]:
        ids = torch.randint(1, 64, (len(lengths), 10), generator=g)
        attention = (torch.arange(10).unsqueeze(0) < torch.tensor(kept).unsqueeze(1)).long()
        ids = ids.masked_fill(attention == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": attention,
                        "labels": response_labels(ids, lengths, attention)})
    return batches


def _learner_steps(learner_fn: Callable, batches: list[dict], lr: float):
    model = _tiny_llama().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = [float(torch.as_tensor(learner_fn(model, batch, optimizer)).detach()) for batch in batches]
    return losses, [p.detach().clone() for p in model.parameters()]


def _hand_steps(batches: list[dict], lr: float, shift: bool = True, clip: bool = True, zero: bool = True):
    """Plain SFT steps with one mistake switched on: the checks' way to name what a learner missed."""
    import torch.nn.functional as F

    model = _tiny_llama().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if zero:
            optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, [p.detach().clone() for p in model.parameters()]


def check_sft_step(learner_fn: Callable) -> CheckResult:
    """Chapter 03, the training loop by hand: `learner_fn(model, batch, optimizer)` does one SFT step
    (the next-token cross-entropy of the label tokens, backward, gradient norm clipped to 1, the
    optimizer's step, gradients zeroed) and returns the loss. Compared with `course_lib.train.train`
    with `lm_loss` over two batches: the losses and every parameter afterwards."""
    from .train import lm_loss, train

    batches, lr = _sft_batches(), 1e-2
    reference = _tiny_llama()
    run = train(reference, lm_loss, batches, steps=len(batches), lr=lr, progress=False)
    expected = (run.losses, [p.detach().clone() for p in reference.parameters()])
    name = "sft_step"
    try:
        actual = _learner_steps(learner_fn, batches, lr)
    except NotImplementedError:
        return report(CheckResult(name, False, "the function still raises NotImplementedError: "
                                               "replace `# YOUR CODE HERE` with your code"))
    except Exception as error:  # a learner's bug: show where, briefly
        where = traceback.extract_tb(error.__traceback__)[-1]
        return report(CheckResult(name, False, f"a step raised {type(error).__name__}: {error} "
                                               f"(line {where.lineno}: {where.line})"))
    why = describe_difference(actual[0], expected[0], 1e-5, 1e-4)
    if why is not None:
        result = CheckResult(name, False, f"the losses of two steps: {why}")
        if describe_difference(actual[0][:1], _hand_steps(batches, lr, shift=False)[0][:1], 1e-5, 1e-4) is None:
            result.details += "\n   hint: the logits at position t predict the token at t + 1: drop the last logit and the first label"
        elif describe_difference(actual[0], _hand_steps(batches, lr, zero=False)[0], 1e-5, 1e-4) is None:
            result.details += "\n   hint: zero the gradients after each step, or the next step adds them up"
        return report(result)
    why = describe_difference(actual[1], expected[1], 1e-5, 1e-4)
    if why is not None:
        result = CheckResult(name, False, f"the losses match, but the parameters after the steps differ ({why})")
        if describe_difference(actual[1], _hand_steps(batches, lr, clip=False)[1], 1e-5, 1e-4) is None:
            result.details += "\n   hint: clip the gradient norm to 1.0 (torch.nn.utils.clip_grad_norm_) before the step"
        return report(result)
    return report(CheckResult(name, True, f"{len(batches)} steps: the same losses and parameters as course_lib.train"))


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
