"""The LLM judge (RLAIF, chapter 05): a model reads two responses and names the better one.

The judge's verdict is the next token of its reply, " A" or " B", read in logit space:
P(A) = σ(logit_A − logit_B), the probability of "A" among the two letters (no division of
probabilities that can underflow to 0/0). Every pair is judged in both orders and the two averaged,
which cancels the judge's position bias (Lee et al. 2023, RLAIF). Direct scoring asks about one
response alone and reads "Yes" against "No" the same way; here the two scores of a pair become a
preference label (Lee et al.'s d-RLAIF instead uses such a score as the RL reward itself). Labels follow
`preference_data`: +1 the pair's `first` response is preferred, −1 the `second`, 0 a tie;
identical responses are a tie for every labeler, by rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .models import chat_prompts
from .preference_data import Pair, PreferencePrompt
from .scoring import next_token_logits, right_padded

JUDGE_TEMPLATE = ("Question: {question}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
                  "Which response is better? The better one answers correctly, follows the question's "
                  "instructions and is short. Answer with A or B.")
SCORE_TEMPLATE = ("Question: {question}\n\nResponse: {response}\n\n"
                  "Is this response correct, does it follow the question's instructions and is it short? "
                  "Answer with Yes or No.")
JUDGE_ANSWER_START = "The better response is Response"
JUDGE_WORDS = (" A", " B")  # after JUDGE_ANSWER_START, the letter comes with its space
SCORE_WORDS = ("Yes", "No")  # the first token of the reply: no space before it
EMPTY = "(no response)"


def verdict_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The token id of each verdict word; each must be one token of the tokenizer, known, and
    different from the others (the verdict is read from one next-token distribution)."""
    ids = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        if len(tokens) != 1:
            raise ValueError(f"the judge reads its verdict from one token, but {word!r} is {len(tokens)} tokens "
                             f"of this tokenizer ({tokens}): use a tokenizer where each of {list(words)} is a "
                             "single token")
        if tokens[0] == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"{word!r} is the unknown token of this tokenizer: it cannot be a verdict")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the verdict words {list(words)} must be distinct tokens, got ids {ids}")
    return ids


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], token_ids: Sequence[int],
                        answer_start: str = "", batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """For each chat prompt (the reply begun with `answer_start`): log P(next token) of each of
    `token_ids` [n, k], and the most likely next token [n]. Right-padded batches (`scoring`)."""
    texts = [t + answer_start for t in chat_prompts(tokenizer, prompts)]
    logprobs, top = [], []
    for start in range(0, len(texts), batch_size):
        batch = right_padded(tokenizer, texts[start:start + batch_size], add_special_tokens=False)
        last = next_token_logits(model, batch).log_softmax(-1)
        logprobs.append(last[:, list(token_ids)].cpu())
        top.append(last.argmax(-1).cpu())
    return torch.cat(logprobs), torch.cat(top)


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
    """RLAIF pairwise judging: P(A) = σ(logit_A − logit_B), every pair judged in both orders.

    The judge's reply is begun for it ("The better response is Response"), so that its next
    token is the verdict; a verdict whose most likely token is neither letter counts as abstained.
    """
    if not pairs:
        raise ValueError("pairs is empty: nothing to judge")
    ids = verdict_token_ids(tokenizer, JUDGE_WORDS)
    texts = [judge_prompt(p.prompt, p.first, p.second) for p in pairs] + \
            [judge_prompt(p.prompt, p.second, p.first) for p in pairs]
    logprobs, top = next_token_logprobs(model, tokenizer, texts, ids, JUDGE_ANSWER_START, batch_size)
    p_a = torch.sigmoid(logprobs[:, 0] - logprobs[:, 1])
    n = len(pairs)
    return JudgeVerdicts(p_a=p_a[:n], p_a_swapped=p_a[n:],
                         abstained=int((~torch.isin(top, torch.tensor(ids))).sum()),
                         letter_mass=float(logprobs.logsumexp(-1).exp().mean()),
                         identical=torch.tensor([p.identical for p in pairs]))


def _yes_minus_no(model, tokenizer, prompts: Sequence[PreferencePrompt], responses: Sequence[str],
                  batch_size: int) -> torch.Tensor:
    """logit("Yes") − logit("No") of the judge scoring each response alone, float64 [n]."""
    if len(prompts) != len(responses):
        raise ValueError(f"need one response per prompt, got {len(responses)} for {len(prompts)}")
    ids = verdict_token_ids(tokenizer, SCORE_WORDS)
    texts = [SCORE_TEMPLATE.format(question=p.text, response=r.strip() or EMPTY)
             for p, r in zip(prompts, responses)]
    logprobs, _ = next_token_logprobs(model, tokenizer, texts, ids, batch_size=batch_size)
    return (logprobs[:, 0] - logprobs[:, 1]).double()


def direct_scores(model, tokenizer, prompts: Sequence[PreferencePrompt], responses: Sequence[str],
                  batch_size: int = 8) -> torch.Tensor:
    """Direct scoring on a two-point scale: each response alone, scored P("Yes") among {"Yes", "No"},
    i.e. σ(logit_Yes − logit_No) (the kind of score d-RLAIF, Lee et al. 2023, uses as the reward)."""
    return torch.sigmoid(_yes_minus_no(model, tokenizer, prompts, responses, batch_size)).float()


def direct_preference(model, tokenizer, pairs: Sequence[Pair], batch_size: int = 8) -> torch.Tensor:
    """P(first better) from direct scores: σ(logit s_first − logit s_second) (Bradley–Terry), where
    logit s = logit_Yes − logit_No."""
    margins = _yes_minus_no(model, tokenizer, [p.prompt for p in pairs] * 2,
                            [p.first for p in pairs] + [p.second for p in pairs], batch_size)
    return torch.sigmoid(margins[:len(pairs)] - margins[len(pairs):]).float()


def labels_from_preference(pairs: Sequence[Pair], p_first: torch.Tensor) -> list[int]:
    """+1 where P(first is better) > 1/2, -1 where < 1/2; identical responses and exact 1/2: 0."""
    if len(pairs) != len(p_first):
        raise ValueError(f"need one preference per pair, got {len(p_first)} for {len(pairs)} pairs")
    if not bool(torch.isfinite(torch.as_tensor(p_first)).all()):
        raise ValueError("p_first holds NaN or infinite values: a preference must be a probability in [0, 1]")
    return [0 if pair.identical else int(torch.sign(p - 0.5).item()) for pair, p in zip(pairs, p_first)]
