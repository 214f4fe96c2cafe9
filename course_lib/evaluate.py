"""Measuring models: perplexity, accuracy with confidence intervals, and timing (every chapter).

perplexity = exp(mean negative log-likelihood per predicted token); padding never counts.
"""
from __future__ import annotations

import inspect
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

    @classmethod
    def from_times(cls, times: Sequence[float]) -> "Timing":
        """The Timing of measured seconds: their median, min and max."""
        if len(times) == 0:
            raise ValueError("times is empty: measure at least once")
        return cls(statistics.median(times), min(times), max(times), tuple(times))

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
    return Timing.from_times(times)


# ----------------------------------------------------------------------------- speed of a language model

def token_batch(tokenizer, texts: Sequence[str], batch_size: int, length: int) -> torch.Tensor:
    """input_ids [batch_size, length] from the first texts that have at least `length` tokens (no padding)."""
    rows = [ids[:length] for ids in tokenizer(list(texts))["input_ids"] if len(ids) >= length]
    if len(rows) < batch_size:
        raise ValueError(f"only {len(rows)} of the texts have {length} tokens; need {batch_size}")
    return torch.tensor(rows[:batch_size])


def _check_timing_args(input_ids, steps: int, repeats: int, warmup: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a [batch, length] tensor of token ids (torch.long), e.g. from token_batch")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1, repeats >= 1, warmup >= 0; got {steps}, {repeats}, {warmup}")


def _decoder(model, input_ids: torch.Tensor, steps: int, speedup: str | None = None):
    """The lean `course_lib.decoder.Decoder` when it can run `model`, else None (transformers' loop).
    Its steps run as CUDA graphs on a GPU, as one C++ call on a CPU (for every model alike: a fair race)."""
    from .decoder import Decoder, supports

    if not supports(model)[0]:
        return None
    speedup = speedup or ("graph" if input_ids.device.type == "cuda" else "fused")
    return Decoder(model, input_ids.shape[0], input_ids.shape[1] + steps + 1, speedup)


def _hf_cache_keyword(model) -> str:
    # transformers 5 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill_timing(model, input_ids: torch.Tensor, repeats: int = 3, warmup: int = 1) -> Timing:
    """Seconds to read a prompt batch into the KV cache (logits of the last position only, as
    `generate` does): the compute-bound phase. Median of `repeats`. Runs `course_lib.decoder`
    where it applies (Llama-family models), transformers' forward otherwise."""
    _check_timing_args(input_ids, 1, repeats, warmup)
    decoder = _decoder(model, input_ids, 1, speedup="eager")  # one large call: nothing to record
    if decoder is not None:
        return benchmark(lambda: decoder.prefill(input_ids), repeats, warmup)
    return benchmark(lambda: model(input_ids=input_ids, use_cache=True, logits_to_keep=1), repeats, warmup)


@torch.no_grad()
def decode_timing(model, input_ids: torch.Tensor, steps: int = 16, repeats: int = 3, warmup: int = 1,
                  speedup: str | None = None) -> Timing:
    """Seconds for `steps` greedy one-token steps after an untimed prefill of `input_ids`: the
    memory-bound phase, every weight read once per step. Median of `repeats`. Runs the lean
    `course_lib.decoder` loop where it applies (`speedup`: see `Decoder`; default CUDA graphs on a
    GPU, the fused C++ step on a CPU), transformers' cache loop otherwise."""
    _check_timing_args(input_ids, steps, repeats, warmup)
    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    prefill, step = _greedy_steps(model, input_ids, steps, speedup)
    times = []
    for run in range(warmup + repeats):
        logits = prefill()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            logits = step(logits)
        sync()
        if run >= warmup:
            times.append(time.perf_counter() - start)
    return Timing.from_times(times)


def _greedy_steps(model, input_ids: torch.Tensor, steps: int, speedup: str | None = None):
    """(prefill, step) for greedy decoding: prefill() reads the prompt and returns the last logits
    [B, vocab]; step(logits) feeds their argmax back and returns the next ones."""
    decoder = _decoder(model, input_ids, steps, speedup)
    if decoder is not None:
        return (lambda: decoder.prefill(input_ids)), (lambda logits: decoder.step(logits.argmax(-1, keepdim=True)))
    keyword, state = _hf_cache_keyword(model), {}

    def forward(ids, **cache):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        state["cache"] = getattr(out, "cache", None) or out.past_key_values
        return out.logits[:, -1]

    return (lambda: forward(input_ids)), (lambda logits: forward(logits.argmax(-1, keepdim=True),
                                                                  **{keyword: state["cache"]}))


def interleaved_speed(models: dict, prompt_ids: torch.Tensor, decode_ids: torch.Tensor,
                      decode_steps: int = 16, repeats: int = 3, speedup: str | None = None) -> dict[str, dict[str, Timing]]:
    """Prefill and decode timings of several models, measured round-robin: one warm-up round, then
    `repeats` rounds of every model in turn, so that a busy machine slows them all alike.
    Returns {name: {"prefill": Timing, "decode": Timing}} (medians over the rounds)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = {name: {"prefill": [], "decode": []} for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            prefill = prefill_timing(model, prompt_ids, repeats=1, warmup=0).median
            decode = decode_timing(model, decode_ids, steps=decode_steps, repeats=1, warmup=0, speedup=speedup).median
            if round_:  # round 0 warms every model up
                times[name]["prefill"].append(prefill)
                times[name]["decode"].append(decode)
    return {name: {phase: Timing.from_times(ts) for phase, ts in phases.items()} for name, phases in times.items()}


def markdown_table(rows: Sequence[dict], floatfmt: str = ".3g") -> str:
    """Rows of dicts (same keys) as a Markdown table, for the "what we measured" cells."""
    if not rows:
        raise ValueError("rows is empty")
    keys = list(rows[0])
    cell = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
