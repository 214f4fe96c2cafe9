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
    assert checks.check_predicted_outcome("which way?", "down", "down", choices, "because")
    assert "you predicted 'down'; the run shows 'down'" in capsys.readouterr().out
    assert checks.check_predicted_outcome("which way?", lambda: "up", "up", choices)
    assert not checks.check_predicted_outcome("which way?", "up", "down", choices, "the reason")
    out = capsys.readouterr().out
    assert "❌" in out and "the run shows 'down'" in out and "the reason" in out
    assert not checks.check_predicted_outcome("which way?", "sideways", "down", choices)
    assert "answer with one of 'up', 'down'" in capsys.readouterr().out

    def todo():
        raise NotImplementedError

    assert not checks.check_predicted_outcome("which way?", todo, "down", choices)
    assert "YOUR CODE HERE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="observed"):
        checks.check_predicted_outcome("which way?", "up", "left", choices)


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
