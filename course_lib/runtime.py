"""Device, seeds, budgets and the cache: the runtime every notebook starts with (chapter 00).

`profile()` reads COURSE_PROFILE (ci | laptop | gpu). Every step count, sample size and sequence
length a notebook uses comes from here, so one switch makes a lecture fit a CI run or a GPU.
"""
from __future__ import annotations

import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import numpy as np
import torch

PROFILES = ("ci", "laptop", "gpu")

# One table of budgets: profile -> chapter section -> setting. Notebooks read them as
# `profile().<section>.<setting>`; nothing else in the course hard-codes a step count.
_BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "ci": {
        # chapter 06 (self-improvement): questions, samples per question, self-training and born-again steps
        "self_improve": {"n_train": 16, "n_heldout": 16, "k": 4, "ks": (1, 2, 4), "format_questions": 6,
                         "format_new_tokens": 32, "steps": 4, "batch_size": 8, "rounds": 1, "born_again_steps": 2,
                         "exercise_questions": 4, "exercise_k": 4,
                         "max_operand": 19, "temperature": 0.7, "threshold": 0.5, "max_new_tokens": 16, "gen_batch_size": 64,
                         "lora_r": 8, "lora_top_layers": 10, "lr": 5e-4},
        "capstone": {"eval_texts": 8, "max_length": 128, "heldout_examples": 8, "questions": 10,
                     "speed_batch": 4, "speed_tokens": 64, "decode_steps": 8, "repeats": 2, "tolerance": 0.5},
        "evaluate": {"eval_texts": 16, "max_length": 128, "batch_size": 8},
        "chat": {"max_new_tokens": 32, "batch_prompts": 4, "speed_new_tokens": 16},
        # chapters 01-02 (quantization): evaluation texts (the corpus's first), calibration texts (its
        # last), speed runs (speed_batch prompts of speed_tokens tokens), GGUF tensors checked bit by bit
        "quant": {"eval_texts": 8, "max_length": 128, "batch_size": 8, "calibration_texts": 8,
                  "speed_batch": 8, "speed_tokens": 64, "decode_steps": 8, "speed_repeats": 2,
                  "gguf_tensors": 12},
        # chapters 03-04 (distillation): student size, teacher-written examples, steps, learning rates
        "distill": {"student_layers": 6, "train_examples": 16, "heldout_examples": 8, "sft_examples": 32,
                    "batch_size": 4, "max_length": 96, "steps": 4, "sft_steps": 8, "warm_start_steps": 3,
                    "warmup_steps": 2, "lr": 5e-4, "lora_r": 16, "lora_lr": 2e-3, "temperature": 1.0,
                    "lmbda": 0.5, "on_policy_new_tokens": 24, "capacity_layers": (3, 6), "choice_layers": (6, 14),
                    "width_choices": ((14, None), (18, 1152), (22, 832)),
                    "capstone_method": "forward_kl", "capstone_layers": 6, "capstone_intermediate_size": None, "capstone_cpu_bfloat16": False, "capstone_steps": 4, "capstone_lr": 5e-4, "capstone_warm_start_steps": 3,
                    "capstone_examples": 16, "capstone_max_length": 96, "capstone_batch_size": 4,
                    "capstone_row_length": None, "capstone_top_k": None, "capstone_human_texts": 0,
                    "pack_max_length": 192, "pack_row_length": 384, "throughput_steps": 2, "top_ks": (8, 64),
                    "live_prompts": 2, "live_new_tokens": 16,
                    "compare_new_tokens": 16, "human_texts": 8},
        # chapter 05 (feedback): prompts, sampled responses, judge/scoring batch, reward model, DPO
        "feedback": {"train_prompts": 24, "eval_prompts": 8, "responses_per_prompt": 2, "best_of_n": 3,
                     "max_new_tokens": 32, "temperature": 0.7, "human_noise": 0.15, "batch_size": 8,
                     "rm_steps": 60, "dpo_steps": 4, "dpo_batch_size": 4, "dpo_lr": 5e-4, "dpo_beta": 0.1, "dpo_nll_weight": 1.0,
                     "lora_r": 8, "lora_layers": 4, "warmup_steps": 2},
    },
    "laptop": {
        "self_improve": {"n_train": 128, "n_heldout": 150, "k": 6, "ks": (1, 2, 4, 8), "format_questions": 16,
                         "format_new_tokens": 48, "steps": 24, "batch_size": 16, "rounds": 2, "born_again_steps": 14,
                         "exercise_questions": 6, "exercise_k": 5,
                         "max_operand": 19, "temperature": 0.7, "threshold": 0.5, "max_new_tokens": 16, "gen_batch_size": 64,
                         "lora_r": 8, "lora_top_layers": 10, "lr": 5e-4},
        "capstone": {"eval_texts": 24, "max_length": 256, "heldout_examples": 40, "questions": 60,
                     "speed_batch": 8, "speed_tokens": 128, "decode_steps": 16, "repeats": 3, "tolerance": 0.5},
        "evaluate": {"eval_texts": 48, "max_length": 256, "batch_size": 8},
        "chat": {"max_new_tokens": 64, "batch_prompts": 8, "speed_new_tokens": 32},
        "quant": {"eval_texts": 48, "max_length": 256, "batch_size": 8, "calibration_texts": 16,
                  "speed_batch": 8, "speed_tokens": 128, "decode_steps": 16, "speed_repeats": 3,
                  "gguf_tensors": 272},
        "distill": {"student_layers": 6, "train_examples": 96, "heldout_examples": 40, "sft_examples": 280,
                    "batch_size": 8, "max_length": 128, "steps": 16, "sft_steps": 60, "warm_start_steps": 6,
                    "warmup_steps": 3, "lr": 5e-4, "lora_r": 16, "lora_lr": 2e-3, "temperature": 1.0,
                    "lmbda": 0.5, "on_policy_new_tokens": 48, "capacity_layers": (3, 6, 10), "choice_layers": (6, 10, 14),
                    "width_choices": ((14, None), (18, 1152), (22, 832)),
                    "capstone_method": "forward_kl", "capstone_layers": 18, "capstone_intermediate_size": 1152, "capstone_cpu_bfloat16": True, "capstone_steps": 40, "capstone_lr": 8e-4, "capstone_warm_start_steps": 3,
                    "capstone_examples": 280, "capstone_max_length": 192, "capstone_batch_size": 4,
                    "capstone_row_length": 512, "capstone_top_k": 64, "capstone_human_texts": 72,
                    "pack_max_length": 192, "pack_row_length": 512, "throughput_steps": 3, "top_ks": (1, 8, 64, 512),
                    "live_prompts": 4, "live_new_tokens": 64,
                    "compare_new_tokens": 64, "human_texts": 48},
        "feedback": {"train_prompts": 80, "eval_prompts": 56, "responses_per_prompt": 2, "best_of_n": 3,
                     "max_new_tokens": 32, "temperature": 0.7, "human_noise": 0.15, "batch_size": 8,
                     "rm_steps": 200, "dpo_steps": 40, "dpo_batch_size": 4, "dpo_lr": 5e-4, "dpo_beta": 0.1, "dpo_nll_weight": 1.0,
                     "lora_r": 8, "lora_layers": 4, "warmup_steps": 4},
    },
    "gpu": {
        "self_improve": {"n_train": 230, "n_heldout": 160, "k": 8, "ks": (1, 2, 4, 8, 16), "format_questions": 40,
                         "format_new_tokens": 64, "steps": 60, "batch_size": 16, "rounds": 3, "born_again_steps": 40,
                         "exercise_questions": 8, "exercise_k": 8,
                         "max_operand": 19, "temperature": 0.7, "threshold": 0.5, "max_new_tokens": 16, "gen_batch_size": 256,
                         "lora_r": 8, "lora_top_layers": 10, "lr": 5e-4},
        "capstone": {"eval_texts": 60, "max_length": 512, "heldout_examples": 40, "questions": 60,
                     "speed_batch": 8, "speed_tokens": 128, "decode_steps": 32, "repeats": 5, "tolerance": 0.5},
        "evaluate": {"eval_texts": 200, "max_length": 512, "batch_size": 32},
        "chat": {"max_new_tokens": 128, "batch_prompts": 8, "speed_new_tokens": 32},
        "quant": {"eval_texts": 116, "max_length": 512, "batch_size": 16, "calibration_texts": 16,
                  "speed_batch": 8, "speed_tokens": 128, "decode_steps": 32, "speed_repeats": 5,
                  "gguf_tensors": 272},
        "distill": {"student_layers": 6, "train_examples": 280, "heldout_examples": 40, "sft_examples": 280,
                    "batch_size": 16, "max_length": 192, "steps": 200, "sft_steps": 300, "warm_start_steps": 50,
                    "warmup_steps": 10, "lr": 3e-4, "lora_r": 16, "lora_lr": 1e-3, "temperature": 1.0,
                    "lmbda": 0.5, "on_policy_new_tokens": 96, "capacity_layers": (3, 6, 10, 15), "choice_layers": (3, 6, 10, 14, 20, 25),
                    "width_choices": ((14, None), (18, 1152), (22, 832), (26, 640)),
                    "capstone_method": "forward_kl", "capstone_layers": 18, "capstone_intermediate_size": 1152, "capstone_cpu_bfloat16": True, "capstone_steps": 400, "capstone_lr": 3e-4, "capstone_warm_start_steps": 10,
                    "capstone_examples": 280, "capstone_max_length": 192, "capstone_batch_size": 16,
                    "capstone_row_length": 512, "capstone_top_k": 64, "capstone_human_texts": 72,
                    "pack_max_length": 192, "pack_row_length": 512, "throughput_steps": 5, "top_ks": (1, 8, 64, 512),
                    "live_prompts": 8, "live_new_tokens": 128,
                    "compare_new_tokens": 96, "human_texts": 132},
        "feedback": {"train_prompts": 100, "eval_prompts": 69, "responses_per_prompt": 4, "best_of_n": 8,
                     "max_new_tokens": 48, "temperature": 0.7, "human_noise": 0.15, "batch_size": 32,
                     "rm_steps": 300, "dpo_steps": 150, "dpo_batch_size": 8, "dpo_lr": 5e-4, "dpo_beta": 0.1, "dpo_nll_weight": 1.0,
                     "lora_r": 16, "lora_layers": 30, "warmup_steps": 10},
    },
}


class Budget(Mapping[str, Any]):
    """A read-only bag of settings for one chapter, readable as attributes or as a mapping."""

    def __init__(self, section: str, values: Mapping[str, Any]):
        self._section = section
        self._values = MappingProxyType(dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(
                f"profile section {self._section!r} has no setting {key!r}; "
                f"it has: {', '.join(sorted(self._values))}") from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Budget({self._section}: {dict(self._values)})"


@dataclass(frozen=True)
class Profile:
    """The active budgets: `profile().evaluate.eval_texts`, `profile().chat.max_new_tokens`, ..."""

    name: str
    sections: Mapping[str, Budget] = field(repr=False)

    def __getattr__(self, section: str) -> Budget:
        sections = object.__getattribute__(self, "sections")
        if section in sections:
            return sections[section]
        raise AttributeError(f"profile {self.name!r} has no section {section!r}; "
                             f"it has: {', '.join(sorted(sections))}")


def profile(name: str | None = None) -> Profile:
    """The Profile named by `name`, else by COURSE_PROFILE, else gpu with CUDA and laptop without."""
    if name is None:
        name = os.environ.get("COURSE_PROFILE", "").strip().lower() or (
            "gpu" if torch.cuda.is_available() else "laptop")
    if name not in PROFILES:
        raise ValueError(f"COURSE_PROFILE={name!r} is not a profile; choose one of "
                         f"{', '.join(PROFILES)} (e.g. `export COURSE_PROFILE=laptop`)")
    return Profile(name, {s: Budget(s, v) for s, v in _BUDGETS[name].items()})


def pick_device() -> torch.device:
    """The fastest device here: cuda > mps > cpu (d2l's try_gpu, one step further)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) so a profile gives the same numbers every run.

    The notebook's own call, at its start: course_lib's functions never reseed the global streams
    (they take a `seed` and run on a forked stream, see `seeded`)."""
    _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block on torch's random stream seeded with `seed`, then give the caller's stream back.

    `torch.random.fork_rng` saves the CPU and CUDA generators and restores them afterwards, so a seeded
    call gives the same result whatever the global seed, and the caller's own random numbers are the
    same as if the call had not happened. `seed=None` runs on the caller's stream (and advances it).
    Used by every seeded course_lib call: sampling, training, the grading checks.
    """
    if seed is None:
        yield
        return
    _check_seed(seed)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def log(message: str) -> None:
    """A progress note for the person at the notebook: "[course_lib] ..." on stderr."""
    print(f"[course_lib] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where models and generated data are cached: COURSE_CACHE, default ~/.cache/course_lib."""
    path = Path(os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "course_lib").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
