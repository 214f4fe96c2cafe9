"""Instant feedback for exercises: `check_<exercise>(learner_fn)` prints a verdict, never a traceback.

Each check runs the learner's function on small fixed inputs, compares with course_lib's own
implementation and says what differs: the first differing values and the largest difference.
"""
from __future__ import annotations

import os
import traceback
from typing import Any, Callable

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


# ----------------------------------------------------------------------------- chapter 00

def check_bytes_at_precision(learner_fn: Callable[[int, float], float]) -> CheckResult:
    """Chapter 00: bytes to store n parameters at a given number of bits."""
    from .models import bytes_at_precision

    cases = [((n, bits), {}, float(bytes_at_precision(n, bits)))
             for n, bits in [(1, 32), (134_515_008, 32), (134_515_008, 16), (134_515_008, 8),
                             (1000, 4), (7_000_000_000, 4.5)]]
    return run_check("bytes_at_precision", learner_fn, cases)
