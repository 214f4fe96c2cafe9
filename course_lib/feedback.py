"""Learning from feedback: a rubric "human" vs an LLM judge, reward models, best-of-n, DPO (chapter 05).

Labels: +1 means the pair's `first` response is preferred, -1 the `second`, 0 a tie. The simulated
human annotator is the written rubric of `preference_data` with a fraction of its verdicts flipped
(human disagreement). The LLM judge reads its verdict from the probabilities of the next token
("A" vs "B"), in both orders (RLAIF, Lee et al. 2023), or scores each response alone (d-RLAIF).
Identical responses are a tie for every labeler, by rule.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import wilson_interval
from .models import chat_prompts
from .preference_data import Pair, PreferencePrompt, deciding_criterion, rubric_preference
from .train import LORA_TARGETS, TrainResult, sft_batch, train

JUDGE_TEMPLATE = ("Question: {question}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
                  "Which response is better? The better one answers correctly, follows the question's "
                  "instructions and is short. Answer with A or B.")
SCORE_TEMPLATE = ("Question: {question}\n\nResponse: {response}\n\n"
                  "Is this response correct, does it follow the question's instructions and is it short? "
                  "Answer with Yes or No.")
JUDGE_ANSWER_START = "The better response is Response"
EMPTY = "(no response)"


# ----------------------------------------------------------------------------- labels

def _check_labels(pairs: Sequence[Pair], labels: Sequence[int]) -> None:
    if len(pairs) != len(labels):
        raise ValueError(f"need one label per pair, got {len(labels)} labels for {len(pairs)} pairs")
    if bad := [x for x in labels if x not in (-1, 0, 1)]:
        raise ValueError(f"labels must be +1 (first), -1 (second) or 0 (tie), got {bad[:3]}")


def rubric_labels(pairs: Sequence[Pair], noise: float = 0.0, seed: int = 0) -> list[int]:
    """The simulated human: the rubric's verdicts, with round(noise · decided) of the decided pairs,
    chosen at random (seeded), flipped to stand for annotators who disagree. Ties stay ties."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a fraction in [0, 1], got {noise}")
    labels = [rubric_preference(pair) for pair in pairs]
    decided = [i for i, label in enumerate(labels) if label != 0]
    for i in random.Random(seed).sample(decided, round(noise * len(decided))):
        labels[i] = -labels[i]
    return labels


def labels_from_preference(pairs: Sequence[Pair], p_first: torch.Tensor) -> list[int]:
    """+1 where P(first is better) > 1/2, -1 where < 1/2; identical responses and exact 1/2: 0."""
    if len(pairs) != len(p_first):
        raise ValueError(f"need one preference per pair, got {len(p_first)} for {len(pairs)} pairs")
    return [0 if pair.identical else int(torch.sign(p - 0.5).item()) for pair, p in zip(pairs, p_first)]


def agreement(labels: Sequence[int], reference: Sequence[int]) -> tuple[int, int]:
    """(agreeing, compared): pairs where both label sources decided, and how many of them agree."""
    if len(labels) != len(reference):
        raise ValueError(f"need equally many labels, got {len(labels)} and {len(reference)}")
    both = [(a, b) for a, b in zip(labels, reference) if a != 0 and b != 0]
    return sum(a == b for a, b in both), len(both)


# ----------------------------------------------------------------------------- the LLM judge

@torch.no_grad()
def next_token_probs(model, tokenizer, prompts: Sequence[str], token_ids: Sequence[int],
                     answer_start: str = "", batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """For each chat prompt (the reply begun with `answer_start`): P(next token) of each of
    `token_ids` [n, k], and the most likely next token [n]."""
    texts = [t + answer_start for t in chat_prompts(tokenizer, prompts)]
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # the next token then sits at position -1 in every row
    probs, top = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        last = model(**batch).logits[:, -1].float().softmax(-1)
        probs.append(last[:, list(token_ids)].cpu())
        top.append(last.argmax(-1).cpu())
    return torch.cat(probs), torch.cat(top)


def average_orders(p_a: torch.Tensor, p_a_swapped: torch.Tensor) -> torch.Tensor:
    """P(first better) with position bias removed: the first response is "A" in one order and "B"
    in the other, so average P(A) from the first order with 1 − P(A) from the swapped order."""
    if p_a.shape != p_a_swapped.shape:
        raise ValueError(f"p_a {tuple(p_a.shape)} and p_a_swapped {tuple(p_a_swapped.shape)} must match")
    return (p_a + (1 - p_a_swapped)) / 2


@dataclass
class JudgeVerdicts:
    """The judge on n pairs in both orders: P("A") when the first response is shown as A (`p_a`)
    and when the order is swapped, the second response shown as A (`p_a_swapped`)."""
    p_a: torch.Tensor
    p_a_swapped: torch.Tensor
    abstained: int  # verdicts (of 2n) whose most likely next token was neither " A" nor " B"
    letter_mass: float  # mean probability the judge put on the two letters at all
    identical: torch.Tensor  # pairs whose two responses are the same text

    @property
    def p_first(self) -> torch.Tensor:
        """P(first better), position bias removed by averaging the two orders."""
        return average_orders(self.p_a, self.p_a_swapped)

    def position_bias(self) -> tuple[int, int]:
        """(same slot, compared): distinct pairs where the judge picks the same slot in both orders,
        i.e. its verdict follows the position, not the response (Lee et al. 2023)."""
        distinct = ~self.identical
        same_slot = (self.p_a > 0.5) == (self.p_a_swapped > 0.5)
        return int((same_slot & distinct).sum()), int(distinct.sum())

    def share_slot_a(self) -> float:
        """How often the judge answers "A" over all 2n verdicts (0.5 for a judge without a favourite)."""
        return float(torch.cat([self.p_a, self.p_a_swapped]).gt(0.5).float().mean())


def judge_prompt(prompt: PreferencePrompt, a: str, b: str) -> str:
    """The pairwise judging prompt: question, Response A, Response B, "Answer with A or B"."""
    return JUDGE_TEMPLATE.format(question=prompt.text, a=a.strip() or EMPTY, b=b.strip() or EMPTY)


def judge_pairs(model, tokenizer, pairs: Sequence[Pair], batch_size: int = 8) -> JudgeVerdicts:
    """RLAIF pairwise judging: P(" A") vs P(" B") normalized, every pair judged in both orders.

    The judge's reply is begun for it ("The better response is Response"), so that its next
    token is the verdict; a verdict whose most likely token is neither letter counts as abstained.
    """
    if not pairs:
        raise ValueError("pairs is empty: nothing to judge")
    ids = [tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" A", " B")]
    texts = [judge_prompt(p.prompt, p.first, p.second) for p in pairs] + \
            [judge_prompt(p.prompt, p.second, p.first) for p in pairs]
    probs, top = next_token_probs(model, tokenizer, texts, ids, JUDGE_ANSWER_START, batch_size)
    p_a = probs[:, 0] / probs.sum(-1)
    n = len(pairs)
    return JudgeVerdicts(p_a=p_a[:n], p_a_swapped=p_a[n:],
                         abstained=int((~torch.isin(top, torch.tensor(ids))).sum()),
                         letter_mass=float(probs.sum(-1).mean()),
                         identical=torch.tensor([p.identical for p in pairs]))


def direct_scores(model, tokenizer, prompts: Sequence[PreferencePrompt], responses: Sequence[str],
                  batch_size: int = 8) -> torch.Tensor:
    """d-RLAIF, two-point scale: each response alone, scored P("Yes") / (P("Yes") + P("No"))."""
    if len(prompts) != len(responses):
        raise ValueError(f"need one response per prompt, got {len(responses)} for {len(prompts)}")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No")]
    texts = [SCORE_TEMPLATE.format(question=p.text, response=r.strip() or EMPTY)
             for p, r in zip(prompts, responses)]
    probs, _ = next_token_probs(model, tokenizer, texts, ids, batch_size=batch_size)
    return probs[:, 0] / probs.sum(-1)


def direct_preference(model, tokenizer, pairs: Sequence[Pair], batch_size: int = 8) -> torch.Tensor:
    """P(first better) from direct scores: σ(logit s_first − logit s_second) (Bradley–Terry)."""
    scores = direct_scores(model, tokenizer, [p.prompt for p in pairs] * 2,
                           [p.first for p in pairs] + [p.second for p in pairs], batch_size)
    logits = torch.logit(scores.double().clamp(1e-9, 1 - 1e-9))
    return torch.sigmoid(logits[:len(pairs)] - logits[len(pairs):]).float()


# ----------------------------------------------------------------------------- preference sets

@dataclass(frozen=True)
class Preference:
    """One training example: a prompt and its chosen and rejected responses."""
    prompt: PreferencePrompt
    chosen: str
    rejected: str


def to_preferences(pairs: Sequence[Pair], labels: Sequence[int]) -> tuple[list[Preference], int]:
    """Chosen/rejected examples from the decided pairs, and the number of ties left out (reported)."""
    _check_labels(pairs, labels)
    kept = [Preference(p.prompt, p.first, p.second) if y == 1 else Preference(p.prompt, p.second, p.first)
            for p, y in zip(pairs, labels) if y != 0]
    return kept, len(pairs) - len(kept)


# ----------------------------------------------------------------------------- reward model

def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry reward-model loss: mean of −log σ(r_chosen − r_rejected)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} "
                         "must have the same shape")
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@torch.no_grad()
def response_features(model, tokenizer, prompts: Sequence[PreferencePrompt], responses: Sequence[str],
                      batch_size: int = 8, max_length: int = 256) -> torch.Tensor:
    """The frozen backbone's last hidden states, averaged over each response's tokens [n, d].

    (Averaged, not the end-of-turn token alone: on this chapter's held-out pairs the average
    made the better reward model.)
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt (> 0), got {len(responses)} for {len(prompts)}")
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    features = []
    for start in range(0, len(prompts), batch_size):
        batch = sft_batch(tokenizer, [p.text for p in prompts[start:start + batch_size]],
                          list(responses[start:start + batch_size]), max_length)
        hidden = decoder(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).last_hidden_state.float()
        in_response = (batch["labels"] != -100).to(device).unsqueeze(-1).float()
        features.append((hidden * in_response).sum(1) / in_response.sum(1))
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
    """Fit a RewardHead to (chosen, rejected) feature pairs with the Bradley–Terry loss."""
    if chosen.shape != rejected.shape or chosen.ndim != 2 or len(chosen) == 0:
        raise ValueError(f"chosen and rejected must be [n, d] feature tensors of one shape, got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
    torch.manual_seed(seed)
    head = RewardHead(torch.cat([chosen, rejected])).to(chosen.device)
    order = torch.randperm(len(chosen))
    batches = [(chosen[order[i:i + batch_size]], rejected[order[i:i + batch_size]])
               for i in range(0, len(chosen), batch_size)]
    result = train(head, lambda m, b: bradley_terry_loss(m(b[0]), m(b[1])), batches, steps, lr=lr,
                   weight_decay=weight_decay, seed=seed, progress=False, desc="reward model")
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


# ----------------------------------------------------------------------------- DPO

def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), sigmoid form: mean of
    −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict the response tokens, and their labels (-100: not a response token).

    Only the positions from the earliest response token on are sent through the LM head
    (`logits_to_keep`): the prompt's next-token logits are never needed.
    """
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    first = max(1, int((labels != -100).int().argmax(1).min()))
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   logits_to_keep=labels.shape[1] - first + 1).logits[:, :-1].float()
    return logits, labels[:, first:]


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(y | x) per row: the summed log-probabilities of the tokens whose label is not -100."""
    logits, labels = response_logits(model, batch)
    token_logps = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * (labels != -100)).sum(-1)


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


@torch.no_grad()
def add_reference_logprobs(policy, batches: Sequence[dict[str, torch.Tensor]]) -> None:
    """Store each batch's log π_ref as "ref_logps": the policy with its LoRA adapters switched off."""
    with policy.disable_adapter():
        for batch in batches:
            batch["ref_logps"] = sequence_logprobs(policy, batch)


def dpo_batch_loss(policy, batch: dict[str, torch.Tensor], beta: float = 0.1,
                   nll_weight: float = 0.0) -> torch.Tensor:
    """The DPO loss of one batch from `preference_batches` (with its reference log-probs), plus
    `nll_weight` × the chosen responses' mean token NLL (RPO, Pang et al. 2024; TRL's `rpo_alpha`):
    DPO alone can lower the chosen answers' likelihood too, as long as the rejected ones fall faster."""
    pi_chosen, pi_rejected = sequence_logprobs(policy, batch).chunk(2)
    ref_chosen, ref_rejected = batch["ref_logps"].to(pi_chosen.device).chunk(2)
    loss = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    if nll_weight:
        chosen_tokens = (batch["labels"][: len(pi_chosen)] != -100).sum().clamp_min(1)
        loss = loss - nll_weight * pi_chosen.sum() / chosen_tokens.to(pi_chosen.device)
    return loss


def top_layer_lora_targets(model, n_layers: int) -> list[str]:
    """Full names of the LoRA target modules in the last `n_layers` decoder layers.

    With adapters only near the top, backpropagation stops there: a DPO step costs little more
    than a forward pass.
    """
    total = model.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers must be between 1 and {total}, got {n_layers}")
    top = {str(i) for i in range(total - n_layers, total)}
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if parts[-1] in LORA_TARGETS and "layers" in parts and parts[parts.index("layers") + 1] in top:
            names.append(name)
    return names


def train_dpo(policy, tokenizer, preferences: Sequence[Preference], steps: int, batch_size: int = 4,
              lr: float = 5e-4, beta: float = 0.1, max_length: int = 256, warmup_steps: int = 0,
              seed: int = 0, progress: bool = True, nll_weight: float = 0.0) -> TrainResult:
    """DPO on a LoRA-wrapped policy; the reference is the same model with the adapters off.
    `nll_weight` > 0 adds RPO's NLL term on the chosen answers (see `dpo_batch_loss`)."""
    if not hasattr(policy, "disable_adapter"):
        raise TypeError("policy must be a peft model (wrap it with course_lib.train.add_lora): "
                        "its adapters switched off are the frozen reference")
    batches = preference_batches(tokenizer, preferences, batch_size, max_length)
    add_reference_logprobs(policy, batches)
    return train(policy, lambda m, b: dpo_batch_loss(m, b, beta, nll_weight), batches, steps, lr=lr, seed=seed,
                 warmup_steps=warmup_steps, progress=progress, desc="DPO")


@torch.no_grad()
def kl_to_reference(policy, tokenizer, prompts: Sequence[PreferencePrompt], responses: Sequence[str],
                    batch_size: int = 8, max_length: int = 256) -> float:
    """Mean per-token KL(π ‖ π_ref) over the response tokens, exact over the vocabulary."""
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = sft_batch(tokenizer, [p.text for p in prompts[start:start + batch_size]],
                          list(responses[start:start + batch_size]), max_length)
        logits, labels = response_logits(policy, batch)
        with policy.disable_adapter():
            ref_logits, _ = response_logits(policy, batch)
        log_p, log_q = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        mask = labels != -100
        total += ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum().item()
        count += int(mask.sum())
    return total / count


# ----------------------------------------------------------------------------- win rate

@dataclass(frozen=True)
class WinRate:
    """Rubric verdicts of candidate vs baseline on the same prompts: wins, losses, ties."""
    wins: int
    losses: int
    ties: int

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def rate(self) -> float:
        """Wins among the decided prompts (ties left out); NaN when none was decided."""
        decided = self.wins + self.losses
        return self.wins / decided if decided else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of `rate` ((0, 1) when nothing was decided)."""
        decided = self.wins + self.losses
        return wilson_interval(self.wins, decided) if decided else (0.0, 1.0)

    def __str__(self) -> str:
        low, high = self.interval
        return (f"{self.rate:.0%} [{low:.0%}, {high:.0%}] ({self.wins} wins, {self.losses} losses, "
                f"{self.ties} ties of {self.n})")


def win_rate(prompts: Sequence[PreferencePrompt], candidate: Sequence[str], baseline: Sequence[str]) -> WinRate:
    """How often the rubric (noise-free) prefers `candidate` over `baseline`, prompt by prompt."""
    if not len(prompts) == len(candidate) == len(baseline) or not prompts:
        raise ValueError(f"need one candidate and one baseline response per prompt (> 0), got "
                         f"{len(prompts)} prompts, {len(candidate)} and {len(baseline)} responses")
    verdicts = [rubric_preference(Pair(p, c, b)) for p, c, b in zip(prompts, candidate, baseline)]
    return WinRate(verdicts.count(1), verdicts.count(-1), verdicts.count(0))


def wins_by_criterion(prompts: Sequence[PreferencePrompt], candidate: Sequence[str],
                      baseline: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(wins, losses) of candidate vs baseline, split by the rubric line that decided each prompt."""
    split: dict[str, list[int]] = {}
    for p, c, b in zip(prompts, candidate, baseline):
        pair = Pair(p, c, b)
        verdict = rubric_preference(pair)
        if verdict != 0:
            split.setdefault(deciding_criterion(pair), [0, 0])[verdict == -1] += 1
    return {line: (w, l) for line, (w, l) in split.items()}
