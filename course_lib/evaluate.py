"""Measuring models: perplexity, accuracy with confidence intervals, and timing (every chapter).

perplexity = exp(mean negative log-likelihood per predicted token); padding never counts.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .scoring import response_logits, response_mask, right_padded


def human_corpus(n: int | None = None) -> list[str]:
    """The shipped human-written evaluation texts (see course_lib/data/README.md), first `n` of them."""
    rows = resources.files("course_lib").joinpath("data/human_corpus.jsonl").read_text("utf-8")
    texts = [json.loads(line)["text"] for line in rows.splitlines() if line.strip()]
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        texts = texts[:n]
    return texts


@torch.no_grad()
def token_nll(model, tokenizer, texts: Sequence[str], max_length: int = 256,
              batch_size: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every predicted token of `texts`, and their count
    (each text's first token is never predicted). Right-padded batches, `course_lib.scoring`."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = right_padded(tokenizer, texts[start:start + batch_size], max_length)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        if not bool(response_mask(batch).any()):
            continue  # every text of this batch is a single token: nothing to predict
        logits, targets = response_logits(model, batch)
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    if count == 0:
        raise ValueError("texts have no token to predict: a text needs at least two tokens (its first is "
                         "never predicted); are the texts empty?")
    return total, count


def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 8) -> float:
    """exp(total NLL / predicted tokens) over `texts`, batched, padding masked out."""
    total, count = token_nll(model, tokenizer, texts, max_length, batch_size)
    return math.exp(total / count)


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need equally many predictions and references (> 0), got "
                         f"{len(predictions)} and {len(references)}")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default); honest at small n and near 0 or 1."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over repeats: the median is the number to report, the spread its noise."""
    median: float
    low: float
    high: float
    times: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.median * 1e3:.1f} ms (min {self.low * 1e3:.1f}, max {self.high * 1e3:.1f}, n={len(self.times)})"


def benchmark(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Time `fn()` `repeats` times after `warmup` untimed calls (CUDA synchronized); median of repeats."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), tuple(times))


def markdown_table(rows: Sequence[dict], floatfmt: str = ".3g") -> str:
    """Rows of dicts (same keys) as a Markdown table, for the "what we measured" cells."""
    if not rows:
        raise ValueError("rows is empty")
    keys = list(rows[0])
    cell = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
