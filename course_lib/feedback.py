"""Chapter 05, learning from feedback: the door to its modules, each found by its name.

- `course_lib.preference_data`: prompts whose quality a rule can check, pairs of responses, the
  written rubric, the simulated human annotator (`rubric_labels`), `agreement`, win rates
- `course_lib.judge`: the LLM judge (RLAIF): both orders, position bias, direct scores
- `course_lib.reward_model`: the Bradley–Terry reward model and best-of-n
- `course_lib.dpo`: DPO on a LoRA policy, each term of its loss per step, its KL to the reference

The course's contract (COURSE.md) names these three here too.
"""
from .dpo import dpo_loss
from .preference_data import win_rate
from .reward_model import bradley_terry_loss

__all__ = ["bradley_terry_loss", "dpo_loss", "win_rate"]
