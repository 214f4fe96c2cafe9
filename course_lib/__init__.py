"""course_lib: the library behind the Small LLMs course notebooks.

One module per idea: runtime (device, seeds, budgets, cache), models (the teacher, students,
generation), scoring (one teacher-forced scorer), evaluate (perplexity, accuracy, benchmarks),
train (the one training loop), quant, int8_inference, gguf_blocks, distill, preference_data, judge,
reward_model, dpo (feedback: the chapter's door), self_improve (the chapters), checks (feedback for
learners).
"""
__version__ = "0.1.0"

# quant re-exports int8_inference, which imports quant's math: loading quant first (here, before any
# submodule) makes every import order work with plain imports.
from . import quant  # noqa: E402,F401
