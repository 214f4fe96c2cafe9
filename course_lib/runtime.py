"""Device, seeds, budgets and the cache: the runtime every notebook starts with (chapter 00).

`profile()` reads COURSE_PROFILE (ci | laptop | gpu). Every step count, sample size and sequence
length a notebook uses comes from here, so one switch makes a lecture fit a CI run or a GPU.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import torch

PROFILES = ("ci", "laptop", "gpu")

# One table of budgets: profile -> chapter section -> setting. Notebooks read them as
# `profile().<section>.<setting>`; nothing else in the course hard-codes a step count.
_BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "ci": {
        "evaluate": {"eval_texts": 16, "max_length": 128, "batch_size": 8},
        "chat": {"max_new_tokens": 32, "batch_prompts": 4, "speed_new_tokens": 16},
    },
    "laptop": {
        "evaluate": {"eval_texts": 48, "max_length": 256, "batch_size": 8},
        "chat": {"max_new_tokens": 64, "batch_prompts": 8, "speed_new_tokens": 32},
    },
    "gpu": {
        "evaluate": {"eval_texts": 200, "max_length": 512, "batch_size": 32},
        "chat": {"max_new_tokens": 128, "batch_prompts": 8, "speed_new_tokens": 32},
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


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) so a profile gives the same numbers every run."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Where models and generated data are cached: COURSE_CACHE, default ~/.cache/course_lib."""
    path = Path(os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "course_lib").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
