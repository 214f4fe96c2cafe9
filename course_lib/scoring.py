"""Teacher-forced scoring: one forward over a right-padded batch, logits only where they are read.

Every chapter reads a model the same way — perplexity (`evaluate.token_nll`), the student's and
the teacher's response rows in distillation (`distill`), the loss of the training loop
(`train.lm_loss`), DPO's log π(y | x) and its KL to the reference (`dpo`), the judge's next token
(`judge`) — and this module is that one way, with one padding convention:

* Batches are RIGHT-padded: row i holds its n_i tokens at positions 0 .. n_i − 1 and padding after
  them (`attention_mask` 1 on real tokens), so every row sees the positions it would see alone.
  Only generation pads on the left (`models.generate`: new tokens are appended on the right);
  `distill.sample_on_policy` turns its samples back into right-padded rows.
* Packed rows (`train.packed_batches`) hold several examples each; their `position_ids` restart
  at 0 for each example, and the model keeps the examples apart by them.
* `labels` are aligned with `input_ids`, −100 where nothing is scored (prompt, padding). The
  logits at position t predict the token at t + 1: they are scored against labels[:, t + 1].
* Only the scored positions pass through the LM head (`logits_to_keep`), and come back as float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .models import model_device


def right_padded(tokenizer, texts: Sequence[str], max_length: int | None = None,
                 add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """`texts` tokenized as one right-padded batch (cut at `max_length` tokens when given); the
    tokenizer's own `padding_side` is left as it was."""
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right",
                          truncation=max_length is not None, max_length=max_length,
                          add_special_tokens=add_special_tokens))


def response_mask(batch: dict) -> torch.Tensor:
    """[B, L − 1]: True where the logits at t predict a label (labels[:, t + 1] != −100)."""
    return batch["labels"][:, 1:] != -100


def _check_right_padded(attention_mask: torch.Tensor) -> None:
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("the batch is left-padded (a row has padding before its tokens): course_lib scores "
                         "right-padded batches, tokens first and padding after (see course_lib.scoring)")


def logits_at(model, batch: dict, where: torch.Tensor) -> torch.Tensor:
    """The logits at the positions `where` marks ([B, L] bool), as float32 [N, vocab] in row-major
    order: one forward of `model`, whose LM head runs only from the first marked column on."""
    _check_right_padded(batch["attention_mask"])
    device = model_device(model)
    where = where.to(device)
    columns = where.any(0).nonzero()
    if len(columns) == 0:
        raise ValueError("no position of the batch is marked for scoring")
    first = int(columns[0])
    if "position_ids" in batch:  # packed rows (train.packed_batches): the positions keep examples apart
        rows = {"position_ids": batch["position_ids"].to(device), "use_cache": False}
    else:
        rows = {"attention_mask": batch["attention_mask"].to(device)}
    logits = model(input_ids=batch["input_ids"].to(device), logits_to_keep=where.shape[1] - first, **rows).logits
    return logits[where[:, first:]].float()


def response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, vocab] float32, targets [N]) at every position that predicts a label, row by row:
    what each loss and metric of a response reads (the targets on the model's device)."""
    mask = response_mask(batch)
    if not bool(mask.any()):
        raise ValueError("the batch has no label token (every label is -100): nothing to score or learn. "
                         "An empty text, or a response cut away by max_length, does this")
    logits = logits_at(model, batch, F.pad(mask, (0, 1)))
    return logits, batch["labels"][:, 1:][mask].to(logits.device)


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """log π(y | x) per row, [B]: the summed log-probabilities of the row's label tokens (DPO's
    sequence log-likelihood, chapter 05)."""
    logits, targets = response_logits(model, batch)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    rows = response_mask(batch).nonzero()[:, 0].to(token_logps.device)
    return torch.zeros(len(batch["labels"]), device=token_logps.device).index_add(0, rows, token_logps)


def next_token_logits(model, batch: dict) -> torch.Tensor:
    """[B, vocab] float32: the logits of the token after each row's last real token (what a judge
    or a classifier reads off a prompt)."""
    lengths = batch["attention_mask"].sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("a row of the batch is empty: no token to continue from")
    where = torch.zeros(batch["attention_mask"].shape, dtype=torch.bool)
    where[torch.arange(len(lengths)), lengths.cpu() - 1] = True
    return logits_at(model, batch, where)
