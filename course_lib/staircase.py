"""The capstone (chapter 07): every stair of the staircase measured with the same yardsticks.

A stair is a model: the teacher, a student made from it, the student distilled on the teacher's
data and logits (chapter 04), then quantized to INT8 (chapter 02). `measure_stair` gives each one
row: size, speed, quality on human and on teacher-written text, and task accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .distill import response_metrics
from .evaluate import decode_timing, perplexity, prefill_timing
from .models import count_parameters, weight_bytes
from .self_improve import Question, answer_questions, score


@dataclass
class Yardsticks:
    """What every stair is measured on: human texts, held-out teacher-written answers (with the
    teacher's logits), held-out arithmetic questions, and a prompt batch for the speed runs."""
    human_texts: Sequence[str]
    heldout_batches: Sequence[dict]
    questions: Sequence[Question]
    speed_ids: torch.Tensor
    decode_steps: int = 16
    repeats: int = 3
    max_length: int = 256


def measure_stair(name: str, model, tokenizer, sticks: Yardsticks) -> dict:
    """One row of the capstone table: parameters, stored MiB, prefill and decode tokens/s,
    perplexity on human and held-out teacher text, top-1 agreement with the teacher, accuracy."""
    batch, length = sticks.speed_ids.shape
    prefill = prefill_timing(model, sticks.speed_ids, repeats=sticks.repeats)
    decode = decode_timing(model, sticks.speed_ids, steps=sticks.decode_steps, repeats=sticks.repeats)
    teacher_text = response_metrics(model, sticks.heldout_batches)
    _, answers = answer_questions(model, tokenizer, sticks.questions)
    return {
        "stair": name,
        "parameters (M)": count_parameters(model) / 1e6,
        "weights (MiB)": weight_bytes(model) / 2**20,
        "prefill tokens/s": batch * length / prefill.median,
        "decode tokens/s": batch * sticks.decode_steps / decode.median,
        "human-text ppl": perplexity(model, tokenizer, sticks.human_texts, sticks.max_length),
        "teacher-text ppl": teacher_text["perplexity"],
        "top-1 = teacher": teacher_text["top1_agreement"],
        "arithmetic accuracy": score(answers, sticks.questions).accuracy,
    }


def plot_quality_vs_size(rows: Sequence[dict], quality: str = "teacher-text ppl", ax=None):
    """Each stair as a point: stored MiB against a perplexity (log scale; lower is better)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    for row in rows:
        ax.scatter(row["weights (MiB)"], row[quality], s=60)
        ax.annotate(row["stair"], (row["weights (MiB)"], row[quality]), fontsize=9,
                    xytext=(6, 4), textcoords="offset points")
    ax.set(xlabel="stored weights (MiB)", ylabel=f"{quality} (log scale, lower is better)",
           yscale="log", title="The staircase: quality against size")
    ax.grid(alpha=0.3)
    return ax


def smallest_within(rows: Sequence[dict], metric: str, reference: str, tolerance: float) -> dict:
    """The stair with the fewest stored MiB whose `metric` (lower is better) is at most
    (1 + tolerance) times the `reference` stair's: the model you would ship."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    by_name = {r["stair"]: r for r in rows}
    if reference not in by_name:
        raise ValueError(f"reference must be one of {list(by_name)}, got {reference!r}")
    limit = by_name[reference][metric] * (1 + tolerance)
    return min((r for r in rows if r[metric] <= limit), key=lambda r: r["weights (MiB)"])
