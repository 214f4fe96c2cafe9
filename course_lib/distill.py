"""Knowledge distillation: the divergences, teacher-scored batches, on-policy samples (chapters 03-04).

A student learns from the teacher's text (sequence-level KD: `method="sft"`, chapter 03) or from its
next-token distributions (token-level KD, chapter 04): forward KL (Hinton et al. 2015), reverse KL
(token-level; MiniLLM, Gu et al. 2023, takes it over sampled sequences), the generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2023),
DistiLLM's skewed KL (Ko et al. 2024), and on-policy KD, where a fraction λ of the batches are the
student's own samples scored by the teacher (GKD). Every run goes through `course_lib.train.train`.

Logits are `(..., vocab)`; the student's and the teacher's must have the same shape. A `mask`
(True = counts) selects the positions that count, e.g. `labels != -100`. Reductions follow TRL's
`GKDTrainer.generalized_jsd_loss(reduction="batchmean")`: with a mask, the mean over the selected
positions; without one, the sum over everything divided by the size of the first dimension.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .evaluate import human_corpus, perplexity
from .models import chat_prompts, load_teacher, make_student, model_device, sampling_settings
from .runtime import cache_dir, profile, seeded
from .scoring import response_logits, response_mask  # noqa: F401 (distill.response_mask, as ever)
from .teacher_data import dataset_sha256, teacher_dataset
from .train import TrainResult, lm_loss, packed_batches, process_rank, sft_batches, train

STUDENT_VERSION = 2  # bump when a change to the training code makes cached students stale
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "hinton")
METHODS = ("sft",) + DIVERGENCES + ("on_policy_jsd",)


# ----------------------------------------------------------------------------- divergences

def _selected(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both logits at the masked positions, as float32, and the divisor of TRL's 'batchmean'."""
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distillation needs the same positions and "
                         f"the same vocabulary (student vocab {student_logits.shape[-1]}, teacher vocab "
                         f"{teacher_logits.shape[-1]})")
    if student_logits.dim() < 2:
        raise ValueError(f"logits must be (..., vocab), got shape {tuple(student_logits.shape)}")
    if mask is None:
        return student_logits.float(), teacher_logits.float(), max(student_logits.shape[0], 1)
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must match the logits without the vocabulary "
                         f"dimension, {tuple(student_logits.shape[:-1])}")
    mask = mask.bool()
    return student_logits[mask].float(), teacher_logits[mask].float(), max(int(mask.sum()), 1)


def _kl_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = Σ p·(log p − log q) over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_probs(student_logits, teacher_logits, temperature: float, mask):
    """(log p_S, log p_T, count) at the selected positions, both logits divided by `temperature`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, teacher, count = _selected(student_logits, teacher_logits, mask)
    return F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1), count


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GKD's JSD_β = β·KL(P_T || M) + (1−β)·KL(P_S || M), M = β·P_T + (1−β)·P_S (Agarwal et al. 2023).

    As in TRL, beta=0 is KL(teacher || student) and beta=1 is KL(student || teacher); both logits
    are divided by `temperature` first. Chapter 04.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_s, log_t, count = _log_probs(student_logits, teacher_logits, temperature, mask)
    if beta == 0:
        per_position = _kl_from_logs(log_t, log_s)
    elif beta == 1:
        per_position = _kl_from_logs(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        per_position = beta * _kl_from_logs(log_t, log_m) + (1 - beta) * _kl_from_logs(log_s, log_m)
    return per_position.sum() / count


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P_T || P_S) = Σ p_T·(log p_T − log p_S): mean-seeking, the classic KD target (chapter 04)."""
    return generalized_jsd(student_logits, teacher_logits, beta=0.0, temperature=temperature, mask=mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P_S || P_T) = Σ p_S·(log p_S − log p_T): mode-seeking, token by token (MiniLLM minimizes
    it over whole sequences the student samples, by policy gradient; chapter 04)."""
    return generalized_jsd(student_logits, teacher_logits, beta=1.0, temperature=temperature, mask=mask)


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, skew: float = 0.1,
            temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DistiLLM's skewed KL(P_T || λ·P_T + (1−λ)·P_S), λ = `skew` (Ko et al. 2024); skew=0 is forward KL."""
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    log_s, log_t, count = _log_probs(student_logits, teacher_logits, temperature, mask)
    log_mix = log_s if skew == 0 else torch.logaddexp(log_t + math.log(skew), log_s + math.log1p(-skew))
    return _kl_from_logs(log_t, log_mix).sum() / count


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Hinton et al. 2015: (1−α)·CE(labels, P_S) + α·T²·KL(P_T^T || P_S^T), labels −100 ignored.

    The T² keeps the soft targets' gradients (which shrink as 1/T²) on the scale of the hard ones.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits without the vocabulary "
                         f"dimension, {tuple(student_logits.shape[:-1])}")
    soft = forward_kl(student_logits, teacher_logits, temperature=temperature, mask=labels != -100)
    hard = F.cross_entropy(student_logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T): T > 1 flattens the distribution, revealing the 'dark knowledge' (chapter 04)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.softmax(logits.float() / temperature, dim=-1)


def divergence_fn(name: str, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The divergence `name` (see DIVERGENCES) as f(student_rows, teacher_rows), settings bound."""
    if name == "forward_kl":
        return lambda s, t: forward_kl(s, t, temperature)
    if name == "reverse_kl":
        return lambda s, t: reverse_kl(s, t, temperature)
    if name == "jsd":
        return lambda s, t: generalized_jsd(s, t, beta, temperature)
    if name == "skew_kl":
        return lambda s, t: skew_kl(s, t, skew, temperature)
    raise ValueError(f"divergence must be one of {DIVERGENCES[:-1]}, got {name!r}")


# ----------------------------------------------------------------------------- batches

def kd_batches(tokenizer, rows: Sequence[dict], batch_size: int = 8, max_length: int = 160,
               row_length: int | None = None, texts: Sequence[str] = ()) -> list[dict]:
    """Chat batches of teacher-written rows (prompt, response): labels on the response tokens only,
    one example per padded row, or with `row_length` packed into rows of that many tokens
    (`train.packed_batches`), where plain `texts` may join them (each cut at `max_length` tokens, every
    token after its first learned)."""
    if not rows:
        raise ValueError("rows is empty: no teacher-written examples to batch")
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    if row_length is not None:
        return packed_batches(tokenizer, prompts, responses, batch_size, max_length, row_length, texts)
    if texts:
        raise ValueError("texts join packed rows only: give row_length too")
    return sft_batches(tokenizer, prompts, responses, batch_size, max_length)


def top_k_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p of the tokens `ids` (N, k) and, as one more bin, of all the others: (N, k + 1) log-probs
    of a distribution over k + 1 outcomes (the rest of the mass in the last column)."""
    total = logits.logsumexp(-1, keepdim=True)
    rest = logits.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([logits.gather(-1, ids), rest], -1) - total


@torch.no_grad()
def with_teacher_logits(teacher, batch: dict, dtype: torch.dtype = torch.float16,
                        device: str | torch.device | None = "cpu", top_k: int | None = None) -> dict:
    """`batch` plus `teacher_logits`: the teacher's logits at the response positions, (N, vocab).

    Kept in float16 and only where the loss looks, so one teacher pass serves every divergence and
    every epoch (a full float32 batch of 8×160 positions would take 250 MB). Cached batches keep
    them on the CPU; `device=None` leaves them on the teacher's device (a live teacher, used at once).
    With `top_k`, only the teacher's k most likely tokens are kept, with the rest of its mass as one
    more bin (`teacher_top_ids` (N, k), `teacher_top_log_probs` (N, k + 1) float32): k + 1 numbers per
    position instead of 49,152, and the divergences compare student and teacher on those k + 1 bins
    (`top_k_fidelity` measures what that costs).
    """
    logits, _ = response_logits(teacher, batch)
    if top_k is None:
        return {**batch, "teacher_logits": logits.to(device or logits.device, dtype)}
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k < logits.shape[-1]:
        raise ValueError(f"top_k must be None (every logit) or an int in 1..{logits.shape[-1] - 1}, got {top_k!r}")
    ids = logits.topk(top_k, dim=-1).indices
    return {**batch, "teacher_top_ids": ids.to(device or logits.device),
            "teacher_top_log_probs": top_k_log_probs(logits, ids).to(device or logits.device)}


def _is_top_k(batch: dict) -> bool:
    return "teacher_top_ids" in batch


def token_kd_loss(divergence: str = "forward_kl", teacher=None, temperature: float = 1.0,
                  beta: float = 0.5, skew: float = 0.1, alpha: float = 0.5) -> Callable[[object, dict], torch.Tensor]:
    """`loss_fn(model, batch)` for `train`: a divergence between student and teacher at the response
    positions. The teacher's logits come from the batch (`with_teacher_logits`, all of them or the
    top k) or from `teacher`. "hinton" mixes the label cross-entropy in (α = `alpha`, T = `temperature`)."""
    if divergence != "hinton":
        measure = divergence_fn(divergence, temperature, beta, skew)

    def loss_fn(model, batch: dict) -> torch.Tensor:
        student, labels = response_logits(model, batch)
        if _is_top_k(batch):  # both as distributions over the teacher's k tokens and the rest (T = 1)
            ids = batch["teacher_top_ids"].to(student.device)
            return measure(top_k_log_probs(student, ids), batch["teacher_top_log_probs"].to(student.device))
        if "teacher_logits" in batch:
            target = batch["teacher_logits"].to(student.device)
        elif teacher is not None:
            target = with_teacher_logits(teacher, batch, dtype=torch.float32, device=None)["teacher_logits"]
        else:
            raise ValueError("the batch has no teacher_logits and no teacher was given: "
                             "use with_teacher_logits(teacher, batch) or token_kd_loss(..., teacher=teacher)")
        if divergence == "hinton":
            return hinton_kd_loss(student, target, labels, temperature, alpha)
        return measure(student, target)

    return loss_fn


def top_k_fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                   divergence: str = "forward_kl") -> dict[str, float]:
    """What caching only the teacher's top k costs, on the same positions: the teacher's mass those
    k tokens hold (mean), the divergence from all logits and from the k + 1 bins, and the cosine
    between the two gradients with respect to the student's logits (1.0: the same direction)."""
    student = student_logits.detach().float().requires_grad_(True)
    teacher = teacher_logits.float()
    measure = divergence_fn(divergence)
    full = measure(student, teacher)
    (full_grad,) = torch.autograd.grad(full, student)
    ids = teacher.topk(k, dim=-1).indices
    teacher_bins = top_k_log_probs(teacher, ids)
    top = measure(top_k_log_probs(student, ids), teacher_bins)
    (top_grad,) = torch.autograd.grad(top, student)
    mass = 1 - teacher_bins[:, -1].exp()
    return {"k": k, "teacher_mass": float(mass.mean()), "divergence_full": float(full.detach()),
            "divergence_top_k": float(top.detach()),
            "gradient_cosine": float(F.cosine_similarity(full_grad.flatten(), top_grad.flatten(), dim=0))}


# ----------------------------------------------------------------------------- on-policy samples

def _end_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


@torch.no_grad()
def sample_on_policy(student, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int | None = None, top_k: int | None = None,
                     top_p: float | None = None) -> dict:
    """The student's own answers to `prompts` as a right-padded training batch (GKD's on-policy data).

    Sampled at `temperature` from the whole distribution unless `top_k` / `top_p` cut it, on a
    forked random stream when `seed` is given (`runtime.seeded`). Sampled token ids are kept as
    they are (no re-tokenization); everything after the first end-of-turn is padding; labels mark
    the sampled tokens only (prompt and padding are −100).
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    sampling = sampling_settings(True, temperature, top_k, top_p)
    device = model_device(student)
    heads = tokenizer(chat_prompts(tokenizer, prompts), return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=False).to(device)
    was_training = student.training
    student.eval()
    try:
        with seeded(seed):
            out = student.generate(**heads, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   **sampling)
    finally:
        student.train(was_training)
    width = heads["input_ids"].shape[1]
    completion = out[:, width:]
    ends = torch.isin(completion, torch.tensor(_end_ids(student, tokenizer), device=device)).int()
    first_end = torch.where(ends.any(1), ends.argmax(1), completion.shape[1])
    keep = torch.arange(completion.shape[1], device=device).unsqueeze(0) <= first_end.unsqueeze(1)
    attention_mask = torch.cat([heads["attention_mask"], keep.long()], dim=1)
    labels = out.clone()
    labels[:, :width] = -100
    # generation padded the prompts on the left; the course scores right-padded rows: move each
    # row's tokens to its start (a stable sort puts the real tokens first, in order)
    order = torch.sort(1 - attention_mask, dim=1, stable=True).indices
    input_ids, attention_mask, labels = (t.gather(1, order) for t in (out, attention_mask, labels))
    labels[attention_mask == 0] = -100
    input_ids[attention_mask == 0] = tokenizer.pad_token_id
    return {"input_ids": input_ids.cpu(), "attention_mask": attention_mask.cpu(), "labels": labels.cpu()}


def on_policy_stream(student, teacher, tokenizer, prompts: Sequence[str], offline: Sequence[dict],
                     lmbda: float = 0.5, batch_size: int = 8, max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int = 0, rank: int | None = None,
                     world: int | None = None) -> Iterator[dict]:
    """Batches for `train`: with probability λ the student's samples scored by the teacher (GKD),
    otherwise the next teacher-written batch of `offline` (which carry `teacher_logits`).

    Each process of a multi-process run (`rank` of `world`, by default `train.process_rank()`)
    draws its own prompts and samples and takes its own share of `offline`; one process gets the
    same stream as ever. The live teacher's logits stay on its device."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
    if lmbda < 1 and not offline:
        raise ValueError("offline batches are needed when lmbda < 1")
    if rank is None or world is None:
        rank, world = process_rank()
    rng = random.Random(seed + rank)
    order = list(prompts)
    step = 0
    while True:
        if rng.random() < lmbda:
            chosen = rng.sample(order, min(batch_size, len(order)))
            batch = sample_on_policy(student, tokenizer, chosen, max_new_tokens, temperature,
                                     seed=seed + step * world + rank)
            yield with_teacher_logits(teacher, batch, device=None)
        else:
            yield offline[(step * world + rank) % len(offline)]
        step += 1


# ----------------------------------------------------------------------------- runs and measures

def distill(student, method: str, batches: Sequence[dict], steps: int, lr: float = 1e-4,
            teacher=None, tokenizer=None, prompts: Sequence[str] = (), lmbda: float = 0.5,
            temperature: float = 1.0, beta: float = 0.5, max_new_tokens: int = 64, grad_accum: int = 1,
            warmup_steps: int = 0, cosine: bool = False, seed: int = 0, progress: bool = True,
            cpu_bfloat16: bool = False) -> TrainResult:
    """Train `student` in place by `method` (see METHODS) for `steps` steps with the shared loop.

    "sft" learns the teacher's text (sequence-level KD, Kim & Rush 2016); the divergences learn the
    teacher's logits carried by `batches`; "on_policy_jsd" mixes in the student's own samples for
    `prompts`, scored by `teacher` (GKD). `cosine` decays the learning rate after the warmup;
    `cpu_bfloat16` trains in bfloat16 autocast on a CPU that multiplies bfloat16 in hardware (`train`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(batches, (str, dict)) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("batches must be a non-empty list of batches (from kd_batches, scored with "
                         "with_teacher_logits for the divergences)")
    if _is_top_k(batches[0]) and (method == "hinton" or temperature != 1.0):
        raise ValueError(f"batches carry the teacher's top-k only, which fixes its distribution at temperature 1: "
                         f"method {method!r} at temperature {temperature} needs every logit "
                         "(with_teacher_logits without top_k)")
    stream: Sequence[dict] | Iterator[dict] = batches
    if method == "sft":
        loss_fn = lm_loss
    elif method == "on_policy_jsd":
        if teacher is None or tokenizer is None or not prompts:
            raise ValueError("on_policy_jsd needs teacher, tokenizer and prompts to sample from")
        loss_fn = token_kd_loss("jsd", temperature=temperature, beta=beta)
        stream = on_policy_stream(student, teacher, tokenizer, prompts, batches, lmbda, len(batches[0]["input_ids"]),
                                  max_new_tokens, temperature, seed)
    else:
        loss_fn = token_kd_loss(method, teacher=teacher, temperature=temperature, beta=beta)
    return train(student, loss_fn, stream, steps=steps, lr=lr, grad_accum=grad_accum, seed=seed,
                 progress=progress, desc=method, warmup_steps=warmup_steps, cosine=cosine, cpu_bfloat16=cpu_bfloat16)


@torch.no_grad()
def response_metrics(model, batches: Sequence[dict]) -> dict[str, float]:
    """Perplexity of the response tokens and how often the model's top-1 token is the teacher's.

    `batches` carry the teacher's logits (from `with_teacher_logits`); the teacher itself scores about
    1.0 (float16 rounding can break a near tie).
    """
    if isinstance(batches, dict) or not batches:
        raise ValueError("batches must be a non-empty list of batches with teacher_logits")
    total, count, agree = 0.0, 0, 0
    for batch in batches:
        rows, labels = response_logits(model, batch)
        total += F.cross_entropy(rows, labels, reduction="sum").item()
        count += labels.numel()
        teacher_top = batch["teacher_top_ids"][:, 0] if _is_top_k(batch) else batch["teacher_logits"].argmax(-1)
        agree += int((rows.argmax(-1) == teacher_top.to(rows.device)).sum())
    return {"perplexity": math.exp(total / count), "top1_agreement": agree / count, "tokens": count}


# ----------------------------------------------------------------------------- the student the capstone reuses

def kd_data(teacher, tokenizer, train_examples: int, heldout_examples: int, batch_size: int,
            max_length: int, row_length: int | None = None, top_k: int | None = None,
            texts: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """Train and held-out batches of the shipped teacher-written set, each scored once by the teacher.
    The training batches may be packed (`row_length`, with plain `texts` joining the answers) and keep
    only the teacher's `top_k`; the held-out ones are one answer per row with every logit, whatever
    the training batches are."""
    train = kd_batches(tokenizer, teacher_dataset("train", n=train_examples), batch_size, max_length, row_length,
                       texts)
    heldout = kd_batches(tokenizer, teacher_dataset("heldout", n=heldout_examples), batch_size, max_length)
    return ([with_teacher_logits(teacher, b, top_k=top_k) for b in train],
            [with_teacher_logits(teacher, b) for b in heldout])


def chapter_recipe(budget=None) -> dict:
    """How chapter 04 compares its methods (`profile().distill`): a `student_layers` student with the
    teacher's most influential layers (`make_student`), a warm start, then `steps` at a learning rate
    that decays by a cosine after the warmup."""
    b = budget if budget is not None else profile().distill
    return {"n_layers": b.student_layers, "method": b.capstone_method, "warm_start_steps": b.warm_start_steps,
            "steps": b.steps, "lr": b.lr, "cosine": True,
            "train_examples": b.train_examples, "batch_size": b.batch_size, "max_length": b.max_length,
            "warmup_steps": b.warmup_steps, "temperature": b.temperature, "lmbda": b.lmbda,
            "on_policy_new_tokens": b.on_policy_new_tokens, "row_length": None, "top_k": None, "human_texts": 0,
            "intermediate_size": None, "cpu_bfloat16": False,
            "seed": 0, "data_sha256": dataset_sha256(), "version": STUDENT_VERSION}


def capstone_recipe(budget=None) -> dict:
    """The student the capstone (chapter 07) ships: chapter 04's recipe with `capstone_method`,
    `capstone_layers` layers, `capstone_steps` steps at `capstone_lr`, and its own data:
    `capstone_examples` teacher-written answers and the last `capstone_human_texts` texts of the human
    corpus (`distillation_texts`), cut at `capstone_max_length` tokens, packed into rows of
    `capstone_row_length` tokens, `capstone_batch_size` rows a step, with the teacher's `capstone_top_k`
    logits; each layer keeps `capstone_intermediate_size` MLP channels (None: all) by Minitron's
    activation importance (in the ci profile, the chapter's own student); with `capstone_cpu_bfloat16`
    it trains in bfloat16 autocast where the CPU multiplies bfloat16 in hardware (`train`)."""
    b = budget if budget is not None else profile().distill
    return {**chapter_recipe(b), "n_layers": b.capstone_layers, "steps": b.capstone_steps, "lr": b.capstone_lr,
            "warm_start_steps": b.capstone_warm_start_steps, "train_examples": b.capstone_examples,
            "max_length": b.capstone_max_length, "batch_size": b.capstone_batch_size,
            "row_length": b.capstone_row_length, "top_k": b.capstone_top_k, "human_texts": b.capstone_human_texts,
            "intermediate_size": b.capstone_intermediate_size, "cpu_bfloat16": b.capstone_cpu_bfloat16}


def distillation_texts(recipe: dict) -> list[str]:
    """The human-written texts a recipe distills on: the LAST `human_texts` of the human corpus, so
    that evaluations, which read its first texts, stay held out (chapter 07 asserts it)."""
    n = recipe["human_texts"]
    return human_corpus()[-n:] if n else []


def student_path(recipe: dict) -> Path:
    """The cache folder of the student made by `recipe` (its hash names it)."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "students" / f"ch04-{recipe['method']}-{recipe['n_layers']}layers-{key}"


def save_student(model, recipe: dict, metrics: dict | None = None) -> Path:
    """Cache a distilled student under its recipe (a temporary folder, then an atomic rename); a
    complete copy already there, saved by another process (two notebooks at once), is kept."""
    target = student_path(recipe)
    if (target / "course_recipe.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".student-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "course_recipe.json").write_text(json.dumps({"recipe": recipe, "metrics": metrics or {}}, indent=1))
        if not (target / "course_recipe.json").is_file():  # else another process saved it meanwhile
            shutil.rmtree(target, ignore_errors=True)  # a leftover without its recipe file
            try:
                os.replace(tmp, target)
            except OSError:  # another process renamed its copy into place first: keep that one
                if not (target / "course_recipe.json").is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def warm_start(teacher, tokenizer, recipe: dict, train_batches: Sequence[dict], progress: bool = True,
               layers: Sequence[int] | None = None):
    """The student every chapter-04 method starts from: `make_student` (the measured `layers` unless
    given, the recipe's MLP width), then `warm_start_steps` of SFT on the teacher's text (MiniLLM and
    GKD, too, start from a fine-tuned student)."""
    student = make_student(teacher, recipe["n_layers"], layers, intermediate_size=recipe["intermediate_size"])
    if recipe["warm_start_steps"]:
        distill(student, "sft", train_batches, steps=recipe["warm_start_steps"], lr=recipe["lr"],
                warmup_steps=recipe["warmup_steps"], seed=recipe["seed"], progress=progress,
                cpu_bfloat16=recipe["cpu_bfloat16"])
    return student


def run_recipe(teacher, tokenizer, recipe: dict, train_batches: Sequence[dict], start=None,
               progress: bool = True, layers: Sequence[int] | None = None):
    """Distill a copy of `start` (default: a fresh `warm_start` from `layers`) by the recipe's method
    for its steps, on `train_batches` (teacher-scored) from where the warm start stopped. Returns
    (student, TrainResult). Chapter 04 runs every method this way, the capstone its one."""
    student = copy.deepcopy(start) if start is not None else warm_start(teacher, tokenizer, recipe, train_batches,
                                                                        progress, layers)
    offset = recipe["warm_start_steps"] % len(train_batches)
    prompts = [r["prompt"] for r in teacher_dataset("train", n=recipe["train_examples"])]
    result = distill(student, recipe["method"], list(train_batches[offset:]) + list(train_batches[:offset]),
                     steps=recipe["steps"], lr=recipe["lr"], teacher=teacher, tokenizer=tokenizer,
                     prompts=prompts, lmbda=recipe["lmbda"], temperature=recipe["temperature"],
                     max_new_tokens=recipe["on_policy_new_tokens"], warmup_steps=recipe["warmup_steps"],
                     cosine=recipe["cosine"], seed=recipe["seed"], progress=progress,
                     cpu_bfloat16=recipe["cpu_bfloat16"])
    return student, result


def distilled_student(teacher=None, tokenizer=None, recipe: dict | None = None, progress: bool = False):
    """The chapter-04 student for the capstone (chapter 07): from the cache, or distilled now and cached.

    Returns (model, info), info = {"recipe", "metrics" (held-out, and the training's seconds and label
    tokens per second, measured when it was made), "path", "built" (True when made by this call)};
    the model is in eval mode on the teacher's device.
    """
    from transformers import AutoModelForCausalLM

    recipe = recipe or capstone_recipe()
    path = student_path(recipe)
    if teacher is None or tokenizer is None:
        teacher, tokenizer = load_teacher()
    built = not (path / "course_recipe.json").is_file()
    if built:
        train_batches, heldout = kd_data(teacher, tokenizer, recipe["train_examples"],
                                         profile().distill.heldout_examples, recipe["batch_size"],
                                         recipe["max_length"], recipe["row_length"], recipe["top_k"],
                                         distillation_texts(recipe))
        student, result = run_recipe(teacher, tokenizer, recipe, train_batches, progress=progress)
        save_student(student, recipe, {**response_metrics(student, heldout), "train_seconds": result.seconds,
                                       "label_tokens_per_second": result.units / result.seconds})
    saved = json.loads((path / "course_recipe.json").read_text())
    param = next(teacher.parameters())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype).to(param.device).eval()
    model.generation_config = copy.deepcopy(teacher.generation_config)
    return model, {**saved, "path": path, "built": built}


def evaluate_student(model, tokenizer, heldout: Sequence[dict], human_texts: Sequence[str],
                     max_length: int = 256, batch_size: int = 8) -> dict[str, float]:
    """The chapters' yardsticks: perplexity and top-1 agreement with the teacher on held-out
    teacher-written answers (`heldout` carry teacher logits), and perplexity on human-written text."""
    scores = response_metrics(model, heldout)
    return {"teacher_text_ppl": scores["perplexity"], "top1_agreement": scores["top1_agreement"],
            "human_ppl": perplexity(model, tokenizer, human_texts, max_length, batch_size)}
