import pytest
import torch

from course_lib import checks
from course_lib.models import bytes_at_precision


def test_a_correct_function_passes(capsys):
    assert checks.check_bytes_at_precision(bytes_at_precision)
    assert "✅ bytes_at_precision: passed" in capsys.readouterr().out


def test_a_wrong_function_is_told_what_differs(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    result = checks.check_bytes_at_precision(lambda n, bits: n * bits)
    out = capsys.readouterr().out
    assert not result and "❌" in out and "got 32, expected 4" in out


def test_an_unfinished_exercise_is_named_not_traced(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)

    def todo(n, bits):
        raise NotImplementedError

    assert not checks.check_bytes_at_precision(todo)
    assert "YOUR CODE HERE" in capsys.readouterr().out


def test_a_crashing_function_shows_error_and_line(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    assert not checks.check_bytes_at_precision(lambda n, bits: n / 0)
    out = capsys.readouterr().out
    assert "ZeroDivisionError" in out and "line" in out


def test_strict_mode_raises_for_ci(monkeypatch):
    monkeypatch.setenv("COURSE_CHECKS_STRICT", "1")
    with pytest.raises(AssertionError, match="bytes_at_precision"):
        checks.check_bytes_at_precision(lambda n, bits: 0.0)


def test_tensor_differences_are_quantified():
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert checks.describe_difference(expected.clone(), expected) is None
    why = checks.describe_difference(torch.tensor([[1.0, 2.5], [3.0, 4.0]]), expected)
    assert "1 of 4 values differ" in why and "at (0, 1): got 2.5, expected 2" in why and "0.5" in why
    assert "shape (4,)" in checks.describe_difference(expected.flatten(), expected)
    assert "item 1" in checks.describe_difference((expected, 1), (expected, 2))
