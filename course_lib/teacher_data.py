"""The teacher writes the training data: course-written instructions, teacher-written answers (chapter 03).

This is the staircase's first step made concrete: a larger model's outputs become a smaller model's
data (sequence-level KD, Kim & Rush 2016; SmolLM2-Instruct itself was tuned on synthetic data).
The prompts (`data/instruction_prompts.jsonl`) were written for the course: 320 instructions in 10
kinds (explanations, definitions, lists, how-tos, rewriting, comparisons, advice, facts, creative,
reasoning), every 8th of each kind held out for evaluation. The answers
(`data/teacher_responses.jsonl`) were sampled from the teacher with a fixed seed, in batches, and
every row records its provenance (weights checksum, sampling parameters, seed, date). Regenerate:

    python -m course_lib.teacher_data generate            # all 320 prompts, about an hour on 2 cores
    python -m course_lib.teacher_data generate --limit 16 --out /tmp/sample.jsonl
    python -m course_lib.teacher_data generate --resume PARTIAL.jsonl   # finish an interrupted run
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from .models import TEACHER_GGUF_SHA256, TEACHER_NAME, generate

PROMPTS_FILE = "data/instruction_prompts.jsonl"
RESPONSES_FILE = "data/teacher_responses.jsonl"
SPLITS = ("train", "heldout")
# How the shipped set was sampled: temperature sampling, because greedy answers of a 135M model
# loop ("a fleeting moment of beauty, a fleeting moment of beauty, ..."); one seed per batch. The
# shipped file was written with top_k=50 in effect (transformers' default, applied because the call
# did not say otherwise; its rows' `sampling` records do not name it): it is explicit here, so a
# regeneration samples the same way and records it.
SAMPLING = {"max_new_tokens": 128, "do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9}
SEED = 0
BATCH_SIZE = 32


def _read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None (both), got {split!r}")


def instruction_prompts(split: str | None = None) -> list[dict]:
    """The course-written instructions: rows with id, category, split ('train' | 'heldout'), prompt."""
    _check_split(split)
    rows = _read_jsonl(resources.files("course_lib").joinpath(PROMPTS_FILE).read_text("utf-8"))
    return [r for r in rows if split is None or r["split"] == split]


def teacher_dataset(split: str | None = "train", n: int | None = None,
                    path: str | Path | None = None) -> list[dict]:
    """Teacher-written rows (id, category, split, prompt, response, provenance) of one split, from
    the shipped JSONL (or `path`), interleaved by category; the first `n` of them."""
    _check_split(split)
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 (or None for all), got {n}")
    text = Path(path).read_text("utf-8") if path is not None else \
        resources.files("course_lib").joinpath(RESPONSES_FILE).read_text("utf-8")
    rows = interleave_categories([r for r in _read_jsonl(text) if split is None or r["split"] == split])
    return rows[:n] if n is not None else rows


def interleave_categories(rows: Sequence[dict]) -> list[dict]:
    """Rows reordered round-robin over their categories, so that the first n cover every kind."""
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    queues = list(by_category.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def dataset_sha256() -> str:
    """sha256 of the shipped teacher-written JSONL: names the data a cached student learned from."""
    return hashlib.sha256(resources.files("course_lib").joinpath(RESPONSES_FILE).read_bytes()).hexdigest()


def weights_sha256(model) -> str:
    """sha256 of the model's weights (every state-dict tensor, by name): which model wrote the data."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def generate_teacher_responses(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 128,
                               temperature: float = 0.7, top_k: int | None = 50, top_p: float = 0.9, seed: int = SEED,
                               batch_size: int = BATCH_SIZE, progress: bool = False) -> Iterable[dict]:
    """Yield each prompt row with the teacher's sampled `response` and its provenance, batch by batch.

    Batch b is sampled with seed `seed + b`, so a batch can be regenerated on its own.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    provenance = {"teacher": TEACHER_NAME, "teacher_weights_sha256": weights_sha256(model),
                  "teacher_gguf_sha256": TEACHER_GGUF_SHA256,
                  "sampling": {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature,
                               "top_k": top_k, "top_p": top_p, "batch_size": batch_size},
                  "date": datetime.date.today().isoformat()}
    starts = range(0, len(rows), batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc="teacher writing", disable=not progress)):
        batch = list(rows[start:start + batch_size])
        replies = generate(model, tokenizer, [r["prompt"] for r in batch], max_new_tokens=max_new_tokens,
                           do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size,
                           seed=seed + batch_index)
        for row, reply in zip(batch, replies):
            n_tokens = len(tokenizer(reply, add_special_tokens=False).input_ids)
            yield {**row, "response": reply, "response_tokens": n_tokens,
                   "seed": seed + batch_index, **provenance}


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSONL atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the data is meant to be read by anyone
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m course_lib.teacher_data generate [--out PATH] [--limit N]`: regenerate the data."""
    import argparse

    from .models import load_teacher

    parser = argparse.ArgumentParser(prog="python -m course_lib.teacher_data")
    parser.add_argument("command", choices=["generate"])
    parser.add_argument("--out", default=str(resources.files("course_lib").joinpath(RESPONSES_FILE)))
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--resume", default=None,
                        help="a partial JSONL of an interrupted run: keep its whole batches, write the rest")
    args = parser.parse_args(argv)
    model, tokenizer = load_teacher(device="cpu")
    rows = instruction_prompts()[:args.limit]
    done = _read_jsonl(Path(args.resume).read_text("utf-8")) if args.resume else []
    done = done[:len(done) // args.batch_size * args.batch_size]
    if [r["id"] for r in done] != [r["id"] for r in rows[:len(done)]]:
        raise ValueError(f"{args.resume} does not hold the first prompts in order: cannot resume from it")
    new = generate_teacher_responses(model, tokenizer, rows[len(done):], seed=args.seed + len(done) // args.batch_size,
                                     batch_size=args.batch_size, progress=True,
                                     **{k: SAMPLING[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p")})
    out = write_jsonl(itertools.chain(done, new), args.out)
    print(f"wrote {len(rows)} teacher-written rows to {out} ({len(done)} kept from {args.resume})")


if __name__ == "__main__":
    main()
