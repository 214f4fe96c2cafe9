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


# ----------------------------------------------------------------------------- predict-then-run, open experiments

@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)


def test_a_prediction_is_graded_against_the_run(capsys, lenient):
    choices = ("under 10%", "about half", "over 90%")
    assert checks.check_prediction("zeros", "over 90%", "over 90%", choices)
    assert not checks.check_prediction("zeros", "about half", "over 90%", choices, why="the step is huge")
    out = capsys.readouterr().out
    assert "you predicted 'about half'; the run measured 'over 90%'" in out and "why: the step is huge" in out
    assert not checks.check_prediction("zeros", "most", "over 90%", choices)
    assert "answer with one of 'under 10%', 'about half', 'over 90%'; got 'most'" in capsys.readouterr().out


def test_a_numeric_prediction_passes_within_its_factor(capsys, lenient):
    assert checks.check_prediction("ratio", 3.0, 5.0, within=2.0)
    assert not checks.check_prediction("ratio", 2.0, 5.0, within=2.0)
    assert "2.5x off, within 2x passes" in capsys.readouterr().out
    assert not checks.check_prediction("ratio", "five", 5.0, within=2.0)
    assert "predict a positive number" in capsys.readouterr().out


def test_an_experiment_is_graded_for_consistency_not_a_value(capsys, lenient):
    measured = {1: {"error": 0.1, "bits": 8.0}, 2: {"error": 0.2, "bits": 6.0}, 4: {"error": 0.3, "bits": 5.0}}
    trends = {"error": "increasing", "bits": "decreasing"}
    assert checks.check_experiment("exp", measured, measured.get, "group", trends)
    assert "3 settings, each result recomputed" in capsys.readouterr().out

    misreported = {**measured, 2: {"error": 0.25, "bits": 6.0}}
    assert not checks.check_experiment("exp", misreported, measured.get, "group", trends)
    assert "group 2: you report error = 0.25, but your own outputs give 0.2" in capsys.readouterr().out

    against = {1: {"error": 0.3, "bits": 8.0}, 2: {"error": 0.2, "bits": 6.0}, 4: {"error": 0.25, "bits": 5.0}}
    assert not checks.check_experiment("exp", against, against.get, "group", trends, why="theory")
    out = capsys.readouterr().out
    assert "error should be increasing in the group, but group 1 gives 0.3 and 2 gives 0.2" in out and "why: theory" in out
    assert checks.check_experiment("exp", against, against.get, "group", {"error": "increasing"}, slack=0.5)

    assert not checks.check_experiment("exp", {1: 0.1, 2: 0.2}, {1: 0.1, 2: 0.2}.get)
    assert "try at least 3 values of the setting; got 2" in capsys.readouterr().out
    assert not checks.check_experiment("exp", {1: {"x": 1.0}, 2: {"x": 1.0}, 3: {"x": 1.0}}, lambda k: {"y": 1.0})
    assert "report 'y' too" in capsys.readouterr().out


def test_the_group_size_experiment_recomputes_the_learners_reconstruction(capsys, lenient):
    from course_lib.quant import fake_quantize, relative_error

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    rebuilt = {g: fake_quantize(weight, 4, group_size=g) for g in (8, 16, 64)}
    results = {g: {"bits/weight": 4 + 32 / g, "error": relative_error(weight, w)} for g, w in rebuilt.items()}
    assert checks.check_group_size_experiment(weight, results, rebuilt, 4)
    wrong = {**results, 16: {"bits/weight": 4 + 32 / 16, "error": 0.0}}
    assert not checks.check_group_size_experiment(weight, wrong, rebuilt, 4)
    assert "group size 16: you report error = 0" in capsys.readouterr().out


def test_w8a8_by_hand_passes_and_a_per_tensor_scale_is_named(capsys, lenient):
    from course_lib.quant import absmax_quantize, int8_matmul

    def by_hand(layer, x, per_token=True):
        rows = x.reshape(-1, layer.in_features)
        q, s = absmax_quantize(rows, 8, dim=-1 if per_token else None)
        y = int8_matmul(q, layer.weight.t()).float() * s * layer.weight_scale.view(1, -1)
        return (y if layer.bias is None else y + layer.bias).view(*x.shape[:-1], -1)

    assert checks.check_w8a8_forward(by_hand)
    assert not checks.check_w8a8_forward(lambda layer, x: by_hand(layer, x, per_token=False))
    assert "hint: one scale per token" in capsys.readouterr().out


def test_the_smoothing_experiment_follows_the_power_law(capsys, lenient):
    from course_lib.int8_inference import smoothing_scales
    from course_lib.quant import fake_quantize, relative_error

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 32, generator=g), torch.randn(16, 32, generator=g)
    x[:, 5] *= 30
    smoothed, results = {}, {}
    for alpha in (0.2, 0.5, 0.8):
        s = smoothing_scales(x.abs().amax(0), [w], alpha)
        smoothed[alpha] = (x / s, w * s)
        spread = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).median())
        y = fake_quantize(x / s, 8, dim=-1) @ fake_quantize(w * s, 8, dim=-1).t()
        results[alpha] = {"activation spread": spread(x / s), "weight spread": spread(w * s),
                          "W8A8 error": relative_error((x.double() @ w.double().t()).float(), y)}
    assert checks.check_smoothing_experiment(x, w, results, smoothed)
    broken = {**smoothed, 0.5: (x / 2, w)}
    assert not checks.check_smoothing_experiment(x, w, results, broken)
    assert "differs from X·Wᵀ" in capsys.readouterr().out


def test_an_sft_step_by_hand_matches_the_course_loop_and_a_missing_clip_is_named(capsys, lenient):
    import torch.nn.functional as F

    def step(model, batch, optimizer, clip=True):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    assert checks.check_sft_step(step)
    assert not checks.check_sft_step(lambda m, b, o: step(m, b, o, clip=False))
    assert "hint: clip the gradient norm" in capsys.readouterr().out


def test_the_temperature_experiment_recomputes_entropy_and_distinct_share(capsys, lenient):
    logits = torch.tensor([3.0, 1.0, 0.5, -2.0])
    samples = {0.5: ["a", "a", "a", "b"], 1.0: ["a", "b", "c", "a"], 2.0: ["a", "b", "c", "d"]}

    def entropy(t):
        p = torch.softmax(logits.double() / t, -1)
        return float(-(p * p.log()).sum())

    results = {t: {"entropy": entropy(t), "distinct share": len(set(s)) / len(s)} for t, s in samples.items()}
    assert checks.check_temperature_experiment(logits, results, samples)
    assert not checks.check_temperature_experiment(logits, {**results, 1.0: {**results[1.0], "distinct share": 1.0}}, samples)
    assert "temperature 1.0: you report distinct share = 1, but your own outputs give 0.75" in capsys.readouterr().out
