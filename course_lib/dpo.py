"""Direct preference optimization (Rafailov et al. 2023) on a LoRA policy (chapter 05).

DPO trains the policy straight from preference pairs, with no reward model: the loss
−log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]) raises the chosen
response's log-ratio to the reference above the rejected one's. The reference is the policy itself
with its LoRA adapters switched off, and `kl_to_reference` measures how far training moved it.
DPO solves RLHF's max_π E[r] − β·KL(π ‖ π_ref) in closed form: its β is that KL's price, and
r = β·log(π/π_ref) is the policy's implicit reward (`dpo_terms` reports its margin and accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .distill import reverse_kl
from .preference_data import Pair, PreferencePrompt, check_labels
from .scoring import response_logits, sequence_logprobs
from .train import TrainResult, examples, sft_batch, sft_batches, train


@dataclass(frozen=True)
class Preference:
    """One training example: a prompt and its chosen and rejected responses."""
    prompt: PreferencePrompt
    chosen: str
    rejected: str


def to_preferences(pairs: Sequence[Pair], labels: Sequence[int]) -> tuple[list[Preference], int]:
    """Chosen/rejected examples from the decided pairs, and the number of ties left out (reported)."""
    check_labels(pairs, labels)
    kept = [Preference(p.prompt, p.first, p.second) if y == 1 else Preference(p.prompt, p.second, p.first)
            for p, y in zip(pairs, labels) if y != 0]
    return kept, len(pairs) - len(kept)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), sigmoid form: mean of
    −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def preference_batches(tokenizer, preferences: Sequence[Preference], batch_size: int = 4,
                       max_length: int = 256) -> list[dict[str, torch.Tensor]]:
    """DPO batches: the chosen rows, then the rejected rows of the same prompts (one forward)."""
    if not preferences:
        raise ValueError("preferences is empty: no decided pairs to learn from")
    batches = []
    for start in range(0, len(preferences), batch_size):
        chunk = preferences[start:start + batch_size]
        prompts = [p.prompt.text for p in chunk] * 2
        batches.append(sft_batch(tokenizer, prompts, [p.chosen for p in chunk] + [p.rejected for p in chunk],
                                 max_length))
    return batches


def _check_peft(policy) -> None:
    if not hasattr(policy, "disable_adapter"):
        raise TypeError("policy must be a peft model (wrap it with course_lib.train.add_lora): "
                        "its adapters switched off are the frozen reference")


@torch.no_grad()
def add_reference_logprobs(policy, batches: Sequence[dict[str, torch.Tensor]]) -> None:
    """Store each batch's log π_ref as "ref_logps": the policy with its LoRA adapters switched off."""
    _check_peft(policy)
    with policy.disable_adapter():
        for batch in batches:
            batch["ref_logps"] = sequence_logprobs(policy, batch)


def dpo_terms(policy, batch: dict[str, torch.Tensor], beta: float = 0.1) -> dict[str, torch.Tensor]:
    """What one batch from `preference_batches` (with its reference log-probs) says about the policy:
    "dpo", the DPO loss; "nll", the chosen answers' mean token NLL (RPO's term); "accuracy", the share
    of pairs whose implicit reward r = β·log(π/π_ref) ranks the chosen answer first; "margin", the
    mean reward margin β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]."""
    pi_chosen, pi_rejected = sequence_logprobs(policy, batch).chunk(2)
    ref_chosen, ref_rejected = batch["ref_logps"].to(pi_chosen.device).chunk(2)
    chosen_tokens = (batch["labels"][: len(pi_chosen)] != -100).sum().clamp_min(1)
    with torch.no_grad():
        margin = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return {"dpo": dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta),
            "nll": -pi_chosen.sum() / chosen_tokens.to(pi_chosen.device),
            "accuracy": (margin > 0).float().mean(), "margin": margin.mean()}


def _rpo_loss(terms: dict[str, torch.Tensor], nll_weight: float) -> torch.Tensor:
    """RPO's objective from `dpo_terms`: the DPO term plus `nll_weight` × the chosen answers' NLL."""
    return terms["dpo"] + nll_weight * terms["nll"] if nll_weight else terms["dpo"]


def dpo_batch_loss(policy, batch: dict[str, torch.Tensor], beta: float = 0.1,
                   nll_weight: float = 0.0) -> torch.Tensor:
    """The DPO loss of one batch from `preference_batches` (with its reference log-probs), plus
    `nll_weight` × the chosen responses' mean token NLL (RPO, Pang et al. 2024; TRL's `rpo_alpha`):
    DPO alone can lower the chosen answers' likelihood too, as long as the rejected ones fall faster."""
    return _rpo_loss(dpo_terms(policy, batch, beta), nll_weight)


@dataclass
class DPOResult(TrainResult):
    """`TrainResult` (`losses` = DPO term + nll_weight × NLL term) and, per optimizer step, each
    term on its own (`dpo_terms`, weighted over the step's pairs like the loss): `dpo` (log 2 while
    the policy is the reference), `nll`, `accuracy` and `margin`."""
    dpo: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)


def train_dpo(policy, tokenizer, preferences: Sequence[Preference], steps: int, batch_size: int = 4,
              lr: float = 5e-4, beta: float = 0.1, max_length: int = 256, warmup_steps: int = 0,
              seed: int = 0, progress: bool = True, nll_weight: float = 0.0, grad_accum: int = 1) -> DPOResult:
    """DPO on a LoRA-wrapped policy; the reference is the same model with the adapters off.
    `nll_weight` > 0 adds RPO's NLL term on the chosen answers (see `dpo_batch_loss`). The loss is
    a mean over pairs, so accumulated batches are weighted by their pairs (`train.examples`).
    The result keeps each term of each step apart (`DPOResult`), as this process saw them."""
    _check_peft(policy)
    batches = preference_batches(tokenizer, preferences, batch_size, max_length)
    add_reference_logprobs(policy, batches)
    seen: list[tuple[int, dict[str, float]]] = []  # (pairs, terms) of each micro-batch, in order

    def loss_fn(model, batch):
        terms = dpo_terms(model, batch, beta)
        seen.append((examples(batch) // 2, {k: float(v.detach()) for k, v in terms.items()}))
        return _rpo_loss(terms, nll_weight)

    run = train(policy, loss_fn, batches, steps, lr=lr, seed=seed, warmup_steps=warmup_steps, progress=progress,
                desc="DPO", grad_accum=grad_accum, weight_fn=examples)
    result = DPOResult(**vars(run))
    for step in range(run.steps):
        micro = seen[step * grad_accum:(step + 1) * grad_accum]
        pairs = sum(n for n, _ in micro)
        for name in ("dpo", "nll", "accuracy", "margin"):
            getattr(result, name).append(sum(n * terms[name] for n, terms in micro) / pairs)
    return result


@torch.no_grad()
def kl_to_reference(policy, tokenizer, prompts: Sequence[PreferencePrompt], responses: Sequence[str],
                    batch_size: int = 8, max_length: int = 256) -> float:
    """Mean per-token KL(π ‖ π_ref) over the response tokens, exact over the vocabulary: chapter
    04's `reverse_kl` with the policy as the student and the reference as the teacher."""
    _check_peft(policy)
    total, count = 0.0, 0
    for batch in sft_batches(tokenizer, [p.text for p in prompts], list(responses), batch_size, max_length):
        logits, _ = response_logits(policy, batch)
        with policy.disable_adapter():
            ref_logits, _ = response_logits(policy, batch)
        total += reverse_kl(logits, ref_logits).item() * len(logits)
        count += len(logits)
    return total / count
