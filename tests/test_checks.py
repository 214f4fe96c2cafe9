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


# ----------------------------------------------------------------------------- predict, then run

def test_a_prediction_is_told_against_the_run(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    choices = ("up", "down")
    assert checks.check_prediction("which way?", "down", "down", choices, "because")
    assert "you predicted 'down'; the run measured 'down'" in capsys.readouterr().out
    assert checks.check_prediction("which way?", lambda: "up", "up", choices)
    assert not checks.check_prediction("which way?", "up", "down", choices, "the reason")
    out = capsys.readouterr().out
    assert "❌" in out and "the run measured 'down'" in out and "the reason" in out
    assert not checks.check_prediction("which way?", "sideways", "down", choices)
    assert "answer with one of 'up', 'down'" in capsys.readouterr().out

    def todo():
        raise NotImplementedError

    assert not checks.check_prediction("which way?", todo, "down", choices)
    assert "YOUR CODE HERE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="outcome"):
        checks.check_prediction("which way?", "up", "left", choices)


# ----------------------------------------------------------------------------- write the loop

def _kd_step(student, batch, optimizer, temperature=1.0, direction="forward", zero=True):
    from course_lib.scoring import response_logits

    logits, _ = response_logits(student, batch)
    log_s = torch.log_softmax(logits / temperature, -1)
    log_t = torch.log_softmax(batch["teacher_logits"] / temperature, -1)
    p, log_p, log_q = (log_t.exp(), log_t, log_s) if direction == "forward" else (log_s.exp(), log_s, log_t)
    loss = (p * (log_p - log_q)).sum(-1).mean()
    if zero:
        optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def test_a_distillation_step_is_checked_by_loss_update_and_second_step(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    assert checks.check_distillation_step(_kd_step)
    capsys.readouterr()
    assert not checks.check_distillation_step(lambda *a, **k: _kd_step(*a, **k, direction="reverse"))
    assert "reverse KL" in capsys.readouterr().out
    assert not checks.check_distillation_step(lambda *a, **k: _kd_step(*a, **k, zero=False))
    assert "zero_grad" in capsys.readouterr().out


def test_a_dpo_step_is_checked_against_course_lib(capsys, monkeypatch):
    from course_lib.dpo import dpo_loss
    from course_lib.scoring import sequence_logprobs

    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)

    def step(policy, batch, optimizer, beta=0.1, swap=False):
        chosen, rejected = sequence_logprobs(policy, batch).chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        if swap:
            chosen, rejected, ref_chosen, ref_rejected = rejected, chosen, ref_rejected, ref_chosen
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    assert checks.check_dpo_step(step)
    capsys.readouterr()
    assert not checks.check_dpo_step(lambda *a, **k: step(*a, **k, swap=True))
    assert "swapped" in capsys.readouterr().out
    assert not checks.check_dpo_step(lambda p, b, o, beta=0.1: None)
    assert "return the loss" in capsys.readouterr().out


def test_an_lmsi_round_is_checked_by_examples_and_training(capsys, monkeypatch):
    from transformers import AutoTokenizer

    from course_lib.models import _prepare_tokenizer, ensure_teacher_checkpoint
    from course_lib.self_improve import confident_examples, training_batches
    from course_lib.train import lm_loss, train

    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(ensure_teacher_checkpoint()))

    def lmsi_round(model, tokenizer, questions, samples, threshold, steps, lr, batch_size, seed, cut=True):
        examples = confident_examples(questions, samples, threshold)
        if not cut:  # the whole reply, rambling included
            full = {(q.text, r) for q, rs in zip(questions, samples.replies) for r in rs}
            examples = [next(f for f in full if f[0] == p and f[1].startswith(r)) for p, r in examples]
        batches = training_batches(tokenizer, examples, batch_size, seed)
        return examples, train(model, lm_loss, batches, steps, lr=lr, seed=seed, progress=False)

    assert checks.check_lmsi_round(lmsi_round, tokenizer)
    capsys.readouterr()
    assert not checks.check_lmsi_round(lambda *a, **k: lmsi_round(*a, **k, cut=False), tokenizer)
    assert "reply_up_to_answer" in capsys.readouterr().out
    assert not checks.check_lmsi_round(lambda *a, **k: lmsi_round(*a, **{**k, "seed": 0}), tokenizer)
    assert "the examples are right, the training is not" in capsys.readouterr().out


# ----------------------------------------------------------------------------- open experiments

def test_a_jsd_sweep_is_recomputed_and_its_conclusion_checked(capsys, monkeypatch):
    from course_lib.distill import generalized_jsd

    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    teacher = torch.tensor([4.0, 0.0, 0.0, 4.0])
    students = {0.0: torch.zeros(4), 0.5: torch.tensor([1.0, 0, 0, 0]), 1.0: torch.tensor([5.0, 0, 0, 0])}

    def row(beta, s):
        p = torch.softmax(s, -1)
        return {"student": s, "jsd": float(generalized_jsd(s[None], teacher[None], beta=beta)),
                "one_side": float(max(p[:2].sum(), p[2:].sum()))}

    sweep = {b: row(b, s) for b, s in students.items()}
    assert checks.check_jsd_sweep(sweep, teacher, picks_from=1.0)
    assert "ln 2" in capsys.readouterr().out
    assert not checks.check_jsd_sweep(sweep, teacher, picks_from=0.5)
    assert "from β = 1.0" in capsys.readouterr().out
    assert not checks.check_jsd_sweep({**sweep, 0.5: {**sweep[0.5], "jsd": 0.9}}, teacher, picks_from=1.0)
    assert "not that of your student" in capsys.readouterr().out
    assert not checks.check_jsd_sweep({0.5: sweep[0.5]}, teacher, picks_from=None)
    assert "at least three" in capsys.readouterr().out


def test_a_noise_sweep_is_recomputed(capsys, monkeypatch):
    from course_lib.preference_data import Pair, PreferencePrompt, agreement, rubric_labels

    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    question = PreferencePrompt("What is 3 plus 4?", "arithmetic", "7")
    pairs = [Pair(question, "7", "8"), Pair(question, "9", "7"), Pair(question, "7", "7"), Pair(question, "7", "It is 7")] * 5
    clean = rubric_labels(pairs)

    def row(noise, held_out=10):
        labels = rubric_labels(pairs, noise=noise, seed=1)
        return {"labels": labels, "agreement": agreement(labels, clean), "rm_accuracy": (held_out // 2, held_out)}

    sweep = {n: row(n) for n in (0.0, 0.2, 0.4)}
    assert checks.check_noise_sweep(sweep, pairs, clean)
    capsys.readouterr()
    assert not checks.check_noise_sweep({**sweep, 0.2: {**sweep[0.2], "agreement": (15, 15)}}, pairs, clean)
    assert "'agreement'" in capsys.readouterr().out
    assert not checks.check_noise_sweep({**sweep, 0.2: row(0.2, held_out=12)}, pairs, clean)
    assert "same" in capsys.readouterr().out
    assert not checks.check_noise_sweep({**sweep, 0.2: {**sweep[0.2], "labels": clean}}, pairs, clean)
    assert "flipped" in capsys.readouterr().out


def test_a_threshold_sweep_is_recomputed(capsys, monkeypatch):
    from course_lib.self_improve import confident_examples

    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    questions, samples = checks._lmsi_case()

    def row(t):
        kept = [(q, v) for q, (v, c) in zip(questions, samples.votes()) if v is not None and c >= t]
        return {"kept": len(kept), "right": sum(v == q.answer for q, v in kept),
                "examples": len(confident_examples(questions, samples, t))}

    sweep = {t: row(t) for t in (0.25, 0.5, 1.0)}
    assert checks.check_threshold_sweep(sweep, questions, samples, chosen=0.5)
    assert "precision" in capsys.readouterr().out
    assert not checks.check_threshold_sweep({**sweep, 1.0: {**sweep[1.0], "right": 1}}, questions, samples, 0.5)
    assert "recomputed: 0" in capsys.readouterr().out
    assert not checks.check_threshold_sweep(sweep, questions, samples, chosen=0.75)


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


def test_an_sft_step_by_hand_matches_the_course_loop_and_each_missing_part_is_named(capsys, lenient):
    import torch.nn.functional as F

    def step(model, batch, optimizer, shift=True, clip=True, zero=True):
        logits, labels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if zero:
            optimizer.zero_grad()
        return loss.item()

    assert checks.check_sft_step(step)
    capsys.readouterr()
    for mistake, named in [("shift", "hint: the logits at position t predict the token at t + 1"),
                           ("clip", "hint: clip the gradient norm to 1.0"),
                           ("zero", "optimizer.zero_grad()")]:
        assert not checks.check_sft_step(lambda m, b, o: step(m, b, o, **{mistake: False}))
        assert named in capsys.readouterr().out, mistake


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
