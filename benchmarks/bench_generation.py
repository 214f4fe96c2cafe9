"""Teacher load time from the warm cache, and batched generation against one prompt at a time.

    python benchmarks/bench_generation.py [--prompts 8] [--new-tokens 32] [--repeats 3]

Both ways generate the same prompts with the same greedy settings; repeats are interleaved so
that a busy machine slows both alike; the ratio of medians is the result.
"""
from __future__ import annotations

import argparse
import statistics
import time

from course_lib.models import generate, load_teacher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loads = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model, tokenizer = load_teacher()
        loads.append(time.perf_counter() - start)
    print(f"load_teacher() from the warm cache: median {statistics.median(loads):.2f} s "
          f"(min {min(loads):.2f}, max {max(loads):.2f})")

    prompts = [f"Write a short sentence about the number {i}." for i in range(args.prompts)]
    # min_new_tokens makes every reply exactly new_tokens long, so tokens/s is exact
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    generate(model, tokenizer, prompts[:1], max_new_tokens=4)  # warm-up
    single, batched = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for p in prompts:
            generate(model, tokenizer, [p], **kwargs)
        single.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate(model, tokenizer, prompts, batch_size=len(prompts), **kwargs)
        batched.append(time.perf_counter() - start)
    tokens = args.prompts * args.new_tokens
    s, b = statistics.median(single), statistics.median(batched)
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens: one at a time {tokens / s:.1f} tokens/s, "
          f"batched {tokens / b:.1f} tokens/s -> {s / b:.2f}x")


if __name__ == "__main__":
    main()
