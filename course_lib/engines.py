"""llama.cpp beside the course: the same GGUF file run by the engine people actually use (chapter 02).

llama-cpp-python is an optional extra (`make engines`: `pip install -e ".[engines]"`, built from
source, 5-10 minutes on 2 cores; on a CPU with AMX, without llama.cpp's AMX path, which crashes there).
`llama_cpp_gguf(kind)` gives the teacher's shipped Q4_1 file, or a Q8_0 / F16 / F32 file made from it
by llama.cpp's own quantizer (cached, once); `llama_cpp_speed` times prefill and batch-1 greedy
decode on it, as `course_lib.evaluate` times the course's models.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from .evaluate import Timing
from .models import TEACHER_NAME, teacher_gguf_path
from .runtime import cache_dir

INSTALL_HINT = ('llama.cpp is not installed: make engines (pip install -e ".[engines]", built from source: '
                '5-10 min on 2 cores; without AMX on CPUs that have it, see the Makefile)')
# llama.cpp's file types (llama.h, enum llama_ftype)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7}


def llama_cpp_available() -> bool:
    """True when llama-cpp-python is installed (the `engines` extra)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _require() -> None:
    if not llama_cpp_available():
        raise ModuleNotFoundError(INSTALL_HINT)


@contextlib.contextmanager
def _c_output_to(path: Path):
    """What C code writes to stdout and stderr (llama.cpp's quantizer: ~800 lines a file) goes to
    `path` instead of the notebook."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "wb") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def llama_cpp_gguf(kind: str = "Q4_1") -> Path:
    """The teacher as a GGUF file of `kind`: "Q4_1" is the shipped file; "Q8_0", "F16" and "F32" are
    made from it once by `llama_cpp.llama_model_quantize` (Q4_1's weights re-encoded: F32 holds them
    exactly) and cached in the course cache's llama_cpp-gguf/ folder, with the quantizer's log beside it."""
    import ctypes

    if kind not in FILE_TYPES:
        raise ValueError(f"kind must be one of {tuple(FILE_TYPES)}, got {kind!r}")
    source = teacher_gguf_path()
    if kind == "Q4_1":
        return source
    target = cache_dir() / "llama_cpp-gguf" / f"{TEACHER_NAME}.{kind}.gguf"
    if target.is_file():
        return target
    _require()
    import llama_cpp

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(prefix=f".{kind}-", suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FILE_TYPES[kind]
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        log = target.with_suffix(".log")
        with _c_output_to(log):
            failed = llama_cpp.llama_model_quantize(str(source).encode(), part.encode(), ctypes.byref(params))
        if failed:
            raise RuntimeError(f"llama.cpp could not make a {kind} file from {source}; its log: {log}")
        os.replace(part, target)  # atomic: the cache holds a whole file or none
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return target


def llama_cpp_speed(path, prompt_ids, new_tokens: int = 32, repeats: int = 3, threads: int | None = None,
                    warmup: int = 1) -> dict:
    """{"prefill": Timing, "decode": Timing, "tokens": the greedy tokens} of llama.cpp on the GGUF at
    `path`, batch 1: reading `prompt_ids` (one sequence of token ids) into a fresh context, then
    `new_tokens` greedy steps.
    Medians of `repeats` after `warmup` runs, `threads` (default torch's) for both phases."""
    import numpy as np
    import torch

    _require()
    import llama_cpp
    from llama_cpp import Llama

    tokens = [int(t) for t in (prompt_ids.flatten().tolist() if hasattr(prompt_ids, "flatten") else prompt_ids)]
    if not tokens or new_tokens < 1 or repeats < 1:
        raise ValueError("need a non-empty prompt, new_tokens >= 1 and repeats >= 1")
    threads = threads or torch.get_num_threads()
    llm = Llama(model_path=str(path), n_ctx=len(tokens) + new_tokens + 8, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def next_token() -> int:  # greedy: the argmax of the last position's logits
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    prefill, decode = [], []
    try:
        for run in range(warmup + repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens)
            middle = time.perf_counter()
            generated = []
            for _ in range(new_tokens):
                generated.append(next_token())
                llm.eval(generated[-1:])
            end = time.perf_counter()
            if run >= warmup:
                prefill.append(middle - start)
                decode.append(end - middle)
    finally:
        llm.close()
    return {"prefill": Timing.from_times(prefill), "decode": Timing.from_times(decode), "tokens": generated}
