"""A Bradley–Terry reward model and best-of-n sampling with it (chapter 05).

The reward model is a linear head on the frozen model's features of a response (its last hidden
states averaged over the response tokens), trained on preference pairs with the Bradley–Terry loss
−log σ(r_chosen − r_rejected). Best-of-n samples n responses and keeps the one it scores highest.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models import model_device
from .preference_data import PreferencePrompt
from .runtime import seeded
from .train import TrainResult, examples, sft_batches, train


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry reward-model loss: mean of −log σ(r_chosen − r_rejected)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} "
                         "must have the same shape")
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@torch.no_grad()
def response_features(model, tokenizer, prompts: Sequence[PreferencePrompt], responses: Sequence[str],
                      batch_size: int = 8, max_length: int = 256) -> torch.Tensor:
    """The frozen backbone's last hidden states, averaged over each response's tokens [n, d]
    (right-padded chat batches from `train.sft_batch`; their labels mark the response tokens).

    (Averaged, not the end-of-turn token alone: on this chapter's held-out pairs the average
    made the better reward model.)
    """
    decoder = model.get_decoder()
    device = model_device(model)
    features = []
    for batch in sft_batches(tokenizer, [p.text for p in prompts], list(responses), batch_size, max_length):
        hidden = decoder(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).last_hidden_state.float()
        in_response = (batch["labels"] != -100).to(device).unsqueeze(-1).float()
        features.append((hidden * in_response).sum(1) / in_response.sum(1))  # sft_batch keeps >= 1 token
    return torch.cat(features)


def candidate_features(model, tokenizer, prompts: Sequence[PreferencePrompt],
                       candidates: Sequence[Sequence[str]], batch_size: int = 8) -> torch.Tensor:
    """`response_features` of k candidates per prompt, shaped [prompts, k, d]."""
    k = len(candidates[0]) if candidates else 0
    if len(prompts) != len(candidates) or k == 0 or any(len(c) != k for c in candidates):
        raise ValueError("need one list of k > 0 candidates per prompt, the same k for every prompt")
    flat = response_features(model, tokenizer, [p for p in prompts for _ in range(k)],
                             [r for c in candidates for r in c], batch_size)
    return flat.view(len(prompts), k, -1)


def labelled_features(features: torch.Tensor, labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) feature rows of the decided pairs; `features` is [prompts, k, d] and the
    labels follow `make_pairs`' order (for each prompt, every i < j)."""
    index = [(p, i, j) for p in range(features.shape[0])
             for i in range(features.shape[1]) for j in range(i + 1, features.shape[1])]
    if len(index) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(index)} pairs of {tuple(features.shape[:2])} candidates")
    decided = [(p, i, j) if y == 1 else (p, j, i) for (p, i, j), y in zip(index, labels) if y != 0]
    if not decided:
        raise ValueError("every pair is a tie: no preference to learn from")
    chosen = torch.stack([features[p, c] for p, c, _ in decided])
    return chosen, torch.stack([features[p, r] for p, _, r in decided])


class RewardHead(nn.Module):
    """The reward model's scalar head on frozen features: r = w·(h − mean)/std + b."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0).clamp_min(1e-6))
        self.linear = nn.Linear(features.shape[1], 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std).squeeze(-1)


def train_reward_model(chosen: torch.Tensor, rejected: torch.Tensor, steps: int = 200, lr: float = 1e-2,
                       weight_decay: float = 1e-2, batch_size: int = 16, seed: int = 0) -> tuple[RewardHead, TrainResult]:
    """Fit a RewardHead to (chosen, rejected) feature pairs with the Bradley–Terry loss (a mean over
    pairs, so the training loop weights each batch by its pairs). Seeded on a forked stream."""
    if chosen.shape != rejected.shape or chosen.ndim != 2 or len(chosen) == 0:
        raise ValueError(f"chosen and rejected must be [n, d] feature tensors of one shape, got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
    with seeded(seed):
        head = RewardHead(torch.cat([chosen, rejected])).to(chosen.device)
        order = torch.randperm(len(chosen))
    batches = [(chosen[order[i:i + batch_size]], rejected[order[i:i + batch_size]])
               for i in range(0, len(chosen), batch_size)]
    result = train(head, lambda m, b: bradley_terry_loss(m(b[0]), m(b[1])), batches, steps, lr=lr,
                   weight_decay=weight_decay, seed=seed, progress=False, desc="reward model", weight_fn=examples)
    return head, result


@torch.no_grad()
def reward_accuracy(head: RewardHead, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[int, int]:
    """(right, n): pairs where the reward model scores the chosen response above the rejected one."""
    return int((head(chosen) > head(rejected)).sum()), len(chosen)


@torch.no_grad()
def rewards(head: RewardHead, features: torch.Tensor) -> torch.Tensor:
    """The reward of every candidate, [prompts, k] from features [prompts, k, d]."""
    return head(features.flatten(0, 1)).view(features.shape[:2])


def best_of_n(candidates: Sequence[Sequence[str]], scores: torch.Tensor) -> list[str]:
    """For each prompt, the candidate with the highest reward (best-of-n sampling)."""
    if scores.shape[0] != len(candidates) or any(len(c) != scores.shape[1] for c in candidates):
        raise ValueError(f"scores {tuple(scores.shape)} must be [prompts, n] for {len(candidates)} "
                         "prompts with n candidates each")
    return [c[i] for c, i in zip(candidates, scores.argmax(1).tolist())]
