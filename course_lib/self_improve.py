"""Self-improvement without labels (chapter 06): the model's own votes become its training data.

LMSI, "Large Language Models Can Self-Improve" (Huang et al. 2022): sample k answers to each
unlabelled question, take the majority answer (self-consistency, Wang et al. 2022), keep the
questions whose vote is confident, fine-tune on the replies that reach the voted answer, repeat.
Born-again networks (Furlanello et al. 2018): a student the size of its teacher learns the
teacher's soft labels. The task is arithmetic, so every answer can be graded against the truth,
which the loop itself never reads.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from .evaluate import wilson_interval
from .models import count_parameters, generate, sample_replies
from .number_words import WORDS_PATTERN, as_number
from .train import TrainResult, lm_loss, train

# ----------------------------------------------------------------------------- the task

ADDITION_TEMPLATE = "What is {a} plus {b}? Answer with the number."


@dataclass(frozen=True)
class Question:
    """A question with a known answer; `pair` (the unordered operands) decides train/held-out."""
    text: str
    answer: int
    pair: tuple[int, int]


def addition_questions(max_operand: int = 9, template: str = ADDITION_TEMPLATE) -> list[Question]:
    """Every "What is a plus b?" for 0 <= a, b <= max_operand, with its answer a + b."""
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"max_operand must be a positive int, got {max_operand!r}")
    if "{a}" not in template or "{b}" not in template:
        raise ValueError(f"template must contain {{a}} and {{b}}, got {template!r}")
    return [Question(template.format(a=a, b=b), a + b, (min(a, b), max(a, b)))
            for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_questions(questions: Sequence[Question], n_train: int, n_heldout: int,
                    seed: int = 0) -> tuple[list[Question], list[Question]]:
    """Unlabelled training questions and a labelled held-out set, disjoint by operand pair.

    A pair goes wholly to one side, so "3 plus 5" in training never leaks "5 plus 3" into the
    held-out set. Pairs are shuffled with `seed`; each side is filled question by question.
    """
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"n_train and n_heldout must be at least 1, got {n_train} and {n_heldout}")
    by_pair: dict[tuple[int, int], list[Question]] = {}
    for q in questions:
        by_pair.setdefault(q.pair, []).append(q)
    pairs = sorted(by_pair)
    random.Random(seed).shuffle(pairs)
    heldout: list[Question] = []
    train: list[Question] = []
    for pair in pairs:
        side = heldout if len(heldout) < n_heldout else train
        side.extend(by_pair[pair])
        if len(train) >= n_train:
            break
    if len(heldout) < n_heldout or len(train) < n_train:
        raise ValueError(f"{len(questions)} questions in {len(pairs)} pairs cannot give {n_train} training "
                         f"and {n_heldout} held-out questions; use a larger max_operand")
    return train[:n_train], heldout[:n_heldout]


# ----------------------------------------------------------------------------- reading the answer

_NUMBER = r"-?\d+(?:\.\d+)?|" + WORDS_PATTERN
# a number that does not start an expression ("2 + 1", "two plus six" are no answers; "3" in "= 3" is)
_ANSWER = rf"(?P<n>{_NUMBER})\b(?!\s*[-+*/×x]\s*\(?\d|\s+(?:plus|minus|times)\b)"
_MARKERS = r"=|\bis\b|\bequals\b|\bequal to\b|\bmakes\b|\bgives(?: us)?\b|\bwe get\b|\banswer:"
_AFTER_MARKER = re.compile(rf"(?:{_MARKERS})[\s*:$]*{_ANSWER}", re.IGNORECASE)
_LEADING = re.compile(rf"^[\s*$]*{_ANSWER}", re.IGNORECASE)


def extract_answer(reply: str) -> int | float | None:
    """The number a chatty reply gives as its answer, or None when it states none.

    Rule: the first number right after "=", "is", "equals", "makes", "gives" or "answer:" that
    does not start an expression ("The answer is 2 + 1 = 3." -> 3); else a number the reply opens
    with ("15"); else None. Number words up to twenty count ("is seven" -> 7).
    """
    match = _answer_match(reply)
    return as_number(match.group("n")) if match else None


def _answer_match(reply: str) -> re.Match | None:
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a string, got {type(reply).__name__}")
    return _AFTER_MARKER.search(reply) or _LEADING.search(reply)


def reply_up_to_answer(reply: str) -> str:
    """The reply cut after its answer (and a closing period): the reasoning path LMSI trains on,
    without the rambling that follows ("4 + 1 = 5\n\nThis is a classic..." -> "4 + 1 = 5")."""
    match = _answer_match(reply)
    if match is None:
        raise ValueError(f"reply states no answer: {reply!r}")
    end = match.end("n")
    return reply[:end + re.match(r"[*.]*", reply[end:]).end()]


# ----------------------------------------------------------------------------- the vote

def majority_vote(answers: Sequence[Hashable | None]) -> tuple[Hashable | None, float]:
    """(most frequent answer, its share of all samples): self-consistency (Wang et al. 2022).

    None (no answer found) never wins but counts in the denominator, so a vote of 3 sevens among
    8 samples has confidence 3/8. Ties go to the answer that appears first in `answers`.
    All None: (None, 0.0).
    """
    if isinstance(answers, (str, bytes)) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of answers (None for 'no answer')")
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, best / len(answers)


# ----------------------------------------------------------------------------- sampling and scoring

@dataclass(frozen=True)
class Samples:
    """k sampled replies per question and the answers read from them: replies[i][j], answers[i][j]."""
    replies: list[list[str]]
    answers: list[list[int | float | None]]

    def votes(self, k: int | None = None) -> list[tuple[int | float | None, float]]:
        """The majority vote of each question over its first `k` samples (all by default)."""
        return [majority_vote(row[:k]) for row in self.answers]


def answer_questions(model, tokenizer, questions: Sequence[Question], max_new_tokens: int = 24,
                     batch_size: int = 32, progress: bool = False) -> tuple[list[str], list]:
    """Greedy replies to `questions` and the answers read from them."""
    replies = generate(model, tokenizer, [q.text for q in questions], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress)
    return replies, [extract_answer(r) for r in replies]


def sample_answers(model, tokenizer, questions: Sequence[Question], k: int, temperature: float = 0.7,
                   max_new_tokens: int = 24, batch_size: int = 32, seed: int = 0,
                   progress: bool = False) -> Samples:
    """k replies per question sampled at `temperature`, all questions batched together."""
    replies = sample_replies(model, tokenizer, [q.text for q in questions], k, max_new_tokens=max_new_tokens,
                             temperature=temperature, batch_size=batch_size, seed=seed, progress=progress)
    return Samples(replies, [[extract_answer(r) for r in row] for row in replies])


@dataclass(frozen=True)
class Score:
    """`correct` of `n` right, with a 95% Wilson interval."""
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.accuracy:.1%} ({self.correct}/{self.n}, 95% CI {low:.1%}-{high:.1%})"


def score(answers: Sequence, questions: Sequence[Question]) -> Score:
    """How many answers equal their question's true answer."""
    if len(answers) != len(questions) or not questions:
        raise ValueError(f"need one answer per question (> 0), got {len(answers)} and {len(questions)}")
    return Score(sum(a == q.answer for a, q in zip(answers, questions)), len(questions))


@dataclass(frozen=True)
class PairedComparison:
    """Before/after on the same questions: how many flipped to right (gained) or to wrong (lost),
    and the exact McNemar p-value (two-sided sign test on the flips) for "no change"."""
    gained: int
    lost: int
    p_value: float


def paired_comparison(before: Sequence[bool], after: Sequence[bool]) -> PairedComparison:
    """McNemar's exact test (1947): under "no change" each flip is a fair coin, so
    p = min(1, 2 * P(Binomial(gained + lost, 1/2) <= min(gained, lost)))."""
    if len(before) != len(after) or not before:
        raise ValueError(f"need the same questions before and after (> 0), "
                         f"got {len(before)} and {len(after)}")
    gained = sum(not b and a for b, a in zip(before, after))
    lost = sum(b and not a for b, a in zip(before, after))
    flips = gained + lost
    tail = sum(math.comb(flips, i) for i in range(min(gained, lost) + 1)) / 2 ** flips
    return PairedComparison(gained, lost, min(1.0, 2 * tail))


def self_consistency_curve(samples: Samples, questions: Sequence[Question],
                           ks: Sequence[int]) -> dict[int, Score]:
    """Accuracy of the majority vote over the first k samples, for each k (Wang et al. 2022)."""
    width = min(len(row) for row in samples.answers)
    if not ks or any(not 1 <= k <= width for k in ks):
        raise ValueError(f"each k must be between 1 and the {width} samples per question, got {list(ks)}")
    return {k: score([answer for answer, _ in samples.votes(k)], questions) for k in ks}


@dataclass(frozen=True)
class CalibrationBin:
    """The votes with confidence in (low, high]: their mean confidence and how many were right."""
    low: float
    high: float
    confidence: float
    score: Score


def calibration(confidences: Sequence[float], correct: Sequence[bool],
                edges: Sequence[float] = (0.0, 0.375, 0.625, 0.875, 1.0)) -> list[CalibrationBin]:
    """One CalibrationBin per non-empty bin low < c <= high (the first bin includes its low edge).

    Calibrated means: answers voted with confidence c are right a fraction c of the time.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"need one correctness per confidence, got {len(confidences)} and {len(correct)}")
    if list(edges) != sorted(edges) or len(edges) < 2:
        raise ValueError(f"edges must be at least two increasing bin edges, got {list(edges)}")
    rows = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        inside = [(c, ok) for c, ok in zip(confidences, correct) if low < c <= high or (i == 0 and c == low)]
        if inside:
            rows.append(CalibrationBin(low, high, sum(c for c, _ in inside) / len(inside),
                                       Score(sum(ok for _, ok in inside), len(inside))))
    return rows


# ----------------------------------------------------------------------------- LMSI self-training

def confident_examples(questions: Sequence[Question], samples: Samples,
                       threshold: float) -> list[tuple[str, str]]:
    """(prompt, reply) training pairs, LMSI-style: for each question whose vote has confidence
    >= `threshold`, every sampled reply that reaches the voted answer, cut after that answer.
    No true answer is read."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a confidence between 0 and 1, got {threshold}")
    if len(questions) != len(samples.answers):
        raise ValueError(f"samples cover {len(samples.answers)} questions, expected {len(questions)}")
    examples = []
    for question, (winner, confidence), replies, answers in zip(
            questions, samples.votes(), samples.replies, samples.answers):
        if winner is not None and confidence >= threshold:
            examples += [(question.text, reply_up_to_answer(r))
                         for r, a in zip(replies, answers) if a == winner]
    return examples


def training_batches(tokenizer, examples: Sequence[tuple[str, str]], batch_size: int,
                     seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The (prompt, reply) examples shuffled with `seed`, as chat batches labelled on the replies."""
    from .distill import kd_batches

    if not examples:
        raise ValueError("no training examples: lower the confidence threshold or sample more")
    order = list(examples)
    random.Random(seed).shuffle(order)
    rows = [{"prompt": p, "response": r} for p, r in order]
    return kd_batches(tokenizer, rows, batch_size, max_length=96)


@dataclass
class RoundResult:
    """One LMSI round: what was sampled, the votes, the examples kept, and the fine-tuning run."""
    samples: Samples
    votes: list[tuple[int | float | None, float]]
    examples: list[tuple[str, str]]
    training: TrainResult


def self_train_round(model, tokenizer, questions: Sequence[Question], k: int = 8, temperature: float = 0.7,
                     threshold: float = 0.5, steps: int = 20, lr: float = 1e-4, batch_size: int = 16,
                     max_new_tokens: int = 24, generation_batch_size: int = 32, seed: int = 0,
                     progress: bool = True) -> RoundResult:
    """generate -> vote -> filter -> fine-tune (LMSI, Huang et al. 2022), on unlabelled `questions`.

    `model` must have trainable parameters (LoRA via `course_lib.train.add_lora`); it is trained in
    place with the course's one loop. Call again for another round with the improved model.
    """
    samples = sample_answers(model, tokenizer, questions, k, temperature, max_new_tokens,
                             generation_batch_size, seed=seed, progress=progress)
    examples = confident_examples(questions, samples, threshold)
    batches = training_batches(tokenizer, examples, batch_size, seed=seed)
    training = train(model, lm_loss, batches, steps=steps, lr=lr, seed=seed, progress=progress,
                     desc="self-training")
    return RoundResult(samples, samples.votes(), examples, training)


# ----------------------------------------------------------------------------- born-again

def born_again(student, teacher, tokenizer, examples: Sequence[tuple[str, str]], steps: int = 20,
               lr: float = 1e-4, batch_size: int = 16, temperature: float = 1.0, seed: int = 0,
               progress: bool = True) -> TrainResult:
    """Born-again networks (Furlanello et al. 2018): train `student`, the same size as `teacher`
    (e.g. a fresh LoRA on the original model), on the teacher's soft labels over the (prompt, reply)
    `examples`: forward KL(teacher || student) on the reply tokens, chapter 04's `distill`."""
    from .distill import distill

    if count_parameters(student) != count_parameters(teacher):
        raise ValueError("a born-again student has its teacher's size: got "
                         f"{count_parameters(student):,} and {count_parameters(teacher):,} parameters")
    teacher.eval()
    return distill(student, "forward_kl", training_batches(tokenizer, examples, batch_size, seed), steps,
                   lr=lr, teacher=teacher, temperature=temperature, seed=seed, progress=progress)


# ----------------------------------------------------------------------------- pictures

def interval_errors(scores: Sequence[Score]) -> list[list[float]]:
    """Matplotlib's `yerr` for the scores' 95% intervals: [[accuracy - low, ...], [high - accuracy, ...]]."""
    return [[s.accuracy - s.interval[0] for s in scores], [s.interval[1] - s.accuracy for s in scores]]


def plot_self_consistency(curve: dict[int, Score], greedy: Score, ax=None):
    """Vote accuracy against k with 95% intervals, and the greedy accuracy as a band (chapter 06)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 4))[1]
    ks = sorted(curve)
    ax.errorbar(ks, [curve[k].accuracy for k in ks], yerr=interval_errors([curve[k] for k in ks]),
                marker="o", capsize=4, label="majority vote of k samples")
    ax.axhline(greedy.accuracy, color="gray", ls="--", label="greedy")
    ax.axhspan(*greedy.interval, color="gray", alpha=0.15)
    ax.set(xscale="log", xlabel="samples per question k", ylabel="held-out accuracy", ylim=(0, 1),
           title="Self-consistency: accuracy as k grows")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.legend()
    return ax


def plot_calibration(bins: list[CalibrationBin], ax=None):
    """Accuracy against mean confidence per bin (95% intervals, counts), and the diagonal (chapter 06)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 4))[1]
    centres = [b.confidence for b in bins]
    scores = [b.score for b in bins]
    ax.plot([0, 1], [0, 1], color="gray", ls="--", label="perfectly calibrated")
    ax.errorbar(centres, [s.accuracy for s in scores], yerr=interval_errors(scores), marker="o", capsize=4,
                ls="none", label="majority vote")
    for x, s in zip(centres, scores):
        ax.annotate(f"n={s.n}", (x, s.accuracy), textcoords="offset points", xytext=(8, -4))
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="vote confidence (share of samples agreeing)",
           ylabel="accuracy of the voted answer", title="Is the vote's confidence calibrated?")
    ax.legend(loc="upper left")
    return ax


def plot_accuracies(results: Sequence[tuple[str, Score]], ax=None):
    """One bar per (name, Score) with its 95% interval: the chapter's before/after picture."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 4))[1]
    scores = [s for _, s in results]
    ax.bar([name for name, _ in results], [s.accuracy for s in scores], yerr=interval_errors(scores),
           capsize=6)
    ax.set(ylabel="held-out greedy accuracy", ylim=(0, 1),
           title=f"{scores[0].n} held-out questions, 95% intervals")
    ax.figure.tight_layout()
    return ax
