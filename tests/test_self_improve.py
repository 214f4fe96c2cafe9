"""course_lib.self_improve: the task, the answer extractor, the vote, and one tiny LMSI round."""
import copy

import pytest
import torch

from course_lib.self_improve import (
    Question, Samples, Score, addition_questions, calibration, confident_examples, extract_answer,
    majority_vote, reply_up_to_answer, score, self_consistency_curve, split_questions)


# ----------------------------------------------------------------------------- the vote

def test_majority_vote_counts_and_confidence():
    assert majority_vote([7, 7, 8, 7]) == (7, 0.75)
    assert majority_vote([3]) == (3, 1.0)


def test_majority_vote_ties_go_to_the_first_seen():
    assert majority_vote([5, 4, 4, 5]) == (5, 0.5)
    assert majority_vote([4, 5, 5, 4]) == (4, 0.5)
    assert majority_vote([None, 9, 2, 2, 9]) == (9, 0.4)


def test_majority_vote_none_never_wins_but_counts():
    assert majority_vote([None, None, None, 6]) == (6, 0.25)
    assert majority_vote([None, None]) == (None, 0.0)


@pytest.mark.parametrize("bad", [[], "77", b"7"])
def test_majority_vote_rejects_empty_or_strings(bad):
    with pytest.raises(ValueError, match="answers"):
        majority_vote(bad)


# ----------------------------------------------------------------------------- the extractor

@pytest.mark.parametrize("reply, expected", [
    ("15", 15),
    ("1 + 4 = 5", 5),
    ("The answer is 7.", 7),
    ("The answer is 2 + 1 = 3.", 3),  # the expression after "is" is not the answer; its result is
    ("To solve this problem, we need to find the sum of 4 and 9.\n\nFirst, we add 4 and 9: 4 + 9 = 19.", 19),
    ("To add 4 + 9, we combine them, which is 13. So, 4 + 9 = 13.", 13),
    ("The answer to this classic math problem is 0. In mathematics, 0 and 7 are", 0),
    ("**8**\n\nExplanation: 3 plus 5 makes eight.", 8),
    ("The sum of 3 and 5 is **8**.", 8),
    ("3 plus 5 equals eight.", 8),
    ("The result is: 12", 12),
    ("1.5\n\nThis is a classic arithmetic operation", 1.5),
    ("5 - 9 = -4", -4),
    ("Five plus one is nine.", 9),
    ("Two plus six is a classic math problem that goes like this", None),
    ("To add 5 and 6, you simply add them together.", None),
    ("The concept of zero is a fundamental aspect of mathematics", None),
    ("", None),
])
def test_extract_answer_on_messy_replies(reply, expected):
    assert extract_answer(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("4 + 1 = 5\n\nThis is a classic example of a mathematical identity", "4 + 1 = 5"),
    ("The answer is 2 + 1 = 3. In mathematics", "The answer is 2 + 1 = 3."),
    ("The sum of 3 and 5 is **8**. Done", "The sum of 3 and 5 is **8**."),
    ("12", "12"),
])
def test_reply_up_to_answer_drops_the_rambling(reply, expected):
    assert reply_up_to_answer(reply) == expected
    assert extract_answer(reply_up_to_answer(reply)) == extract_answer(reply)


def test_reply_up_to_answer_needs_an_answer():
    with pytest.raises(ValueError, match="no answer"):
        reply_up_to_answer("To add 5 and 6, you simply add them together.")


def test_extract_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="reply"):
        extract_answer(7)


# ----------------------------------------------------------------------------- the task

def test_addition_questions_know_their_answers():
    questions = addition_questions(9)
    assert len(questions) == 100
    q = next(q for q in questions if q.text.startswith("What is 3 plus 8?"))
    assert q.answer == 11 and q.pair == (3, 8)


def test_split_never_overlaps_not_even_by_swapped_operands():
    train, heldout = split_questions(addition_questions(19), n_train=150, n_heldout=120, seed=3)
    assert (len(train), len(heldout)) == (150, 120)
    assert not {q.pair for q in train} & {q.pair for q in heldout}
    assert not {q.text for q in train} & {q.text for q in heldout}
    assert split_questions(addition_questions(19), 150, 120, seed=3) == (train, heldout)


def test_split_refuses_when_too_few_questions():
    with pytest.raises(ValueError, match="max_operand"):
        split_questions(addition_questions(3), n_train=10, n_heldout=10)


# ----------------------------------------------------------------------------- scoring

QUESTIONS = [Question("a", 3, (1, 2)), Question("b", 5, (2, 3)), Question("c", 9, (4, 5))]
SAMPLES = Samples(replies=[["r"] * 4] * 3,
                  answers=[[3, 4, 3, 3], [6, 5, 5, None], [1, 2, 9, 2]])


def test_score_and_interval():
    result = score([3, 6, 9], QUESTIONS)
    assert (result.correct, result.n) == (2, 3)
    low, high = result.interval
    assert low < 2 / 3 < high


def test_self_consistency_curve_votes_over_the_first_k():
    curve = self_consistency_curve(SAMPLES, QUESTIONS, [1, 3, 4])
    assert curve[1] == Score(1, 3)  # first samples: 3 right, 6 wrong, 1 wrong
    assert curve[3] == Score(2, 3)  # 3 and 5 win; [1, 2, 9] is a tie won by the first, 1
    assert curve[4] == Score(2, 3)  # [1, 2, 9, 2] -> 2, wrong
    with pytest.raises(ValueError, match="k"):
        self_consistency_curve(SAMPLES, QUESTIONS, [5])


def test_calibration_bins_confidences():
    rows = calibration([0.25, 0.5, 0.5, 1.0, 1.0, 0.0], [False, True, False, True, True, False])
    assert [(b.low, b.high, b.confidence, b.score.correct, b.score.n) for b in rows] == \
        [(0.0, 0.375, 0.125, 0, 2), (0.375, 0.625, 0.5, 1, 2), (0.875, 1.0, 1.0, 2, 2)]
    with pytest.raises(ValueError, match="edges"):
        calibration([0.5], [True], edges=(1.0, 0.0))


def test_confident_examples_keep_replies_that_reach_a_confident_vote():
    samples = Samples(replies=[["3", "4", "3", "3"], ["6", "5", "5 is it", "x"], ["1", "2", "9", "2"]],
                      answers=SAMPLES.answers)
    assert confident_examples(QUESTIONS, samples, threshold=0.75) == [("a", "3")] * 3
    assert confident_examples(QUESTIONS, samples, threshold=0.5) == \
        [("a", "3")] * 3 + [("b", "5")] * 2 + [("c", "2")] * 2  # "5 is it" cut after its answer
    with pytest.raises(ValueError, match="threshold"):
        confident_examples(QUESTIONS, samples, threshold=2)


# ----------------------------------------------------------------------------- with the real model

@pytest.fixture(scope="module")
def lora_copy(teacher):
    """A LoRA-wrapped copy of the teacher (the shared fixture itself stays untouched)."""
    from course_lib.train import add_lora

    model, tokenizer = teacher
    return add_lora(copy.deepcopy(model), r=4, alpha=8, layers=[28, 29]), tokenizer


@pytest.mark.slow
def test_self_train_round_runs_on_a_tiny_budget(lora_copy):
    from course_lib.self_improve import self_train_round

    model, tokenizer = lora_copy
    questions = [q for q in addition_questions(9) if q.pair in {(2, 2), (1, 3)}][:2]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = self_train_round(model, tokenizer, questions, k=3, temperature=0.7, threshold=0.0,
                              steps=1, batch_size=4, max_new_tokens=10, seed=0, progress=False)
    assert len(result.samples.replies) == 2 and all(len(row) == 3 for row in result.samples.replies)
    assert result.votes == result.samples.votes()
    assert result.examples, "the model answered nothing readable"
    for prompt, reply in result.examples:
        question = next(q for q in questions if q.text == prompt)
        winner = result.votes[questions.index(question)][0]
        assert extract_answer(reply) == winner
    assert result.training.steps == 1 and torch.isfinite(torch.tensor(result.training.losses)).all()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n and (".28." in n or ".29." in n) for n in changed)


@pytest.mark.slow
def test_add_lora_rejects_layers_the_model_lacks(teacher):
    from course_lib.train import add_lora

    with pytest.raises(ValueError, match="layers"):
        add_lora(teacher[0], layers=[30])  # refused before the model is touched


def test_paired_comparison_is_mcnemars_exact_test():
    from course_lib.self_improve import paired_comparison

    none = paired_comparison([True, False], [True, False])
    assert (none.gained, none.lost, none.p_value) == (0, 0, 1.0)
    result = paired_comparison([False] * 10 + [True] * 5, [True] * 10 + [True] * 5)
    assert (result.gained, result.lost) == (10, 0)
    assert result.p_value == pytest.approx(2 / 2 ** 10)
    mixed = paired_comparison([False, False, False, True], [True, True, True, False])
    assert mixed.p_value == pytest.approx(2 * (1 + 4) / 16)  # scipy.stats.binomtest(1, 4).pvalue


@pytest.mark.slow
def test_born_again_student_learns_from_a_same_size_teacher(teacher):
    from course_lib.self_improve import born_again
    from course_lib.train import add_lora

    model, tokenizer = teacher
    big_teacher = add_lora(copy.deepcopy(model), r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():  # give the teacher's adapters something to teach
        for name, p in big_teacher.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    student = add_lora(copy.deepcopy(model), r=4, alpha=8)
    teacher_before = {n: p.detach().clone() for n, p in big_teacher.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    examples = [("What is 2 plus 2? Answer with the number.", "2 + 2 = 4"),
                ("What is 3 plus 5? Answer with the number.", "The answer is 8.")]
    result = born_again(student, big_teacher, tokenizer, examples, steps=1, batch_size=2, progress=False)
    assert result.steps == 1 and result.losses[0] > 0
    assert all(torch.equal(p, teacher_before[n]) for n, p in big_teacher.named_parameters())
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, student_before[n])}
    assert changed and all("lora_" in n for n in changed)
    with pytest.raises(ValueError, match="size"):
        born_again(copy.deepcopy(model), big_teacher, tokenizer, examples, steps=1, progress=False)
