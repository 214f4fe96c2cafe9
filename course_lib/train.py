"""The one training loop of the course (chapters 03-06): seeded, progress bar, LoRA or full.

Built on accelerate's `Accelerator`, so the same loop runs on a CPU, one GPU, or several GPUs
under `accelerate launch` (data-parallel: each process takes its own micro-batches, DDP averages
the gradients once per optimizer step). Anything trainable fits: `loss_fn(model, batch)` returns
the MEAN loss of its batch (SFT cross-entropy, a KD divergence, the DPO loss, ...) and the loop
weights each mean by what it averaged over (`label_tokens`, or `examples` for per-example losses),
so accumulation and more processes give the gradient of one big batch. On a CUDA GPU the forward
passes run in bfloat16 autocast with TF32 matmuls; a CPU trains in float32, or with `cpu_bfloat16`
in bfloat16 autocast where it multiplies bfloat16 in hardware (`kernels.cpu_has_bf16_matmul`).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .kernels import cpu_has_bf16_matmul
from .models import chat_prompts
from .runtime import seeded
from .scoring import response_logits, response_mask

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainResult:
    """What a run did: the loss of each optimizer step (the weighted mean over this process's
    micro-batches), wall time, steps taken, the gradient norm of each step before clipping, and how
    many units (`weight_fn`: label tokens, or examples) this process learned from in all, so that
    `units / seconds` is its training throughput."""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    grad_norms: list[float] = field(default_factory=list)
    units: float = 0.0


def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: Sequence[str] = LORA_TARGETS, layers: Sequence[int] | None = None):
    """Wrap `model` with LoRA adapters (Hu et al. 2021, W + B·A·alpha/r) through peft; only A, B train.

    `layers` (decoder layer indices) limits the adapters to those layers: with only the top layers
    adapted, backpropagation stops there, which makes each step cheaper (chapter 06).
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank r must be at least 1, got {r}")
    if layers is not None:
        n = model.config.num_hidden_layers
        layers = sorted(set(layers))
        if not layers or not all(isinstance(i, int) and 0 <= i < n for i in layers):
            raise ValueError(f"layers must be decoder layer indices in 0..{n - 1}, got {layers}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _batch_stream(batches, rank: int, world: int):
    """Cycle a list of batches (each process taking every world-th one), or pass an iterator through."""
    if isinstance(batches, Sequence):
        if len(batches) == 0:
            raise ValueError("batches is empty: nothing to train on")
        i = rank
        while True:
            yield batches[i % len(batches)]
            i += world
    else:
        yield from batches


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) as `accelerate launch` and torchrun set them
    (RANK, WORLD_SIZE); (0, 1) in a notebook. Streams that make their own batches (on-policy
    samples) use it to give each process its own data."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def default_accelerator():
    """`Accelerator()`, except that several processes without CUDA (e.g. `accelerate launch
    --multi_gpu --num_processes 2` or `torchrun` on a CPU machine) get CPU data-parallel over gloo,
    where accelerate would otherwise run each process alone without saying so."""
    from accelerate import Accelerator

    several = process_rank()[1] > 1
    return Accelerator(cpu=several and not torch.cuda.is_available())


def label_tokens(batch: dict) -> int:
    """How many tokens a language-model loss averages over: the batch's next-token labels
    (labels[:, 1:] != -100), the weight `train` gives its mean."""
    return int(response_mask(batch).sum())


def examples(batch) -> int:
    """How many examples a per-example loss averages over (DPO's pairs, a reward model's pairs):
    the rows of the batch's first tensor."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(first)


def _default_weight(batch) -> int:
    return label_tokens(batch) if isinstance(batch, dict) and "labels" in batch else examples(batch)


def autocast_for(device: torch.device, cpu_bfloat16: bool = False):
    """bfloat16 autocast for a forward pass on a CUDA GPU that has it and, with `cpu_bfloat16`, on a
    CPU that multiplies bfloat16 in hardware (`cpu_has_bf16_matmul`); anything else runs float32.
    Weights, gradients and the optimizer stay float32 (mixed precision, Micikevicius et al. 2018)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bfloat16 and cpu_has_bf16_matmul():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def tf32_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 float32 matmuls (`torch.set_float32_matmul_precision("high")`) while training on a CUDA
    device, the caller's setting restored afterwards; elsewhere nothing changes."""
    if device.type != "cuda":
        yield
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def lr_factor(step: int, steps: int, warmup_steps: int = 0, cosine: bool = False) -> float:
    """The learning rate of optimizer step `step` (from 0) as a fraction of the peak: a linear warmup
    over `warmup_steps`, then constant, or with `cosine` ½(1 + cos(π·t)), t = the fraction of the
    steps after the warmup already taken (Loshchilov & Hutter 2017)."""
    if step < warmup_steps or not cosine:
        return min(1.0, (step + 1) / (warmup_steps + 1))
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup_steps) / max(steps - warmup_steps, 1), 1.0)))


def train(model, loss_fn: Callable, batches: Sequence | Iterable, steps: int, lr: float = 1e-4,
          grad_accum: int = 1, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
          seed: int = 0, progress: bool = True, desc: str = "training", accelerator=None,
          warmup_steps: int = 0, weight_fn: Callable | None = None, cosine: bool = False,
          cpu_bfloat16: bool = False) -> TrainResult:
    """Minimize `loss_fn(model, batch)` for `steps` optimizer steps of `grad_accum` micro-batches.

    `loss_fn` returns the mean loss of its batch and `weight_fn(batch)` how many units that mean
    averaged (default: `label_tokens` when the batch has labels, else `examples`). A step weights
    micro-batch i by w_i / Σw, the sum over all micro-batches of the step on every process: its
    gradient is the gradient of the mean over all those units — one big batch — rather than a mean
    of per-batch means, which would overweight short batches. Under several processes the gradients
    are all-reduced once per step (`no_sync` on the other micro-batches).
    `batches` is a list (cycled) or an iterator (e.g. on-policy samples drawn as training goes).
    Only parameters with requires_grad train (LoRA: the adapters). `warmup_steps` ramps the
    learning rate linearly up to `lr` (short runs from a broken start diverge less); `cosine` then
    decays it towards 0 (`lr_factor`). `cpu_bfloat16` runs the forward passes in bfloat16 autocast on
    a CPU that multiplies bfloat16 in hardware (`autocast_for`; a CUDA GPU always does). Seeded on a
    forked random stream (the caller's is left as it was); trains `model` in place and leaves it in
    eval mode.
    """
    from tqdm.auto import tqdm

    if steps < 1 or grad_accum < 1:
        raise ValueError(f"steps and grad_accum must be at least 1, got {steps} and {grad_accum}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not isinstance(cpu_bfloat16, bool):
        raise ValueError(f"cpu_bfloat16 must be True or False, got {cpu_bfloat16!r}")
    accelerator = accelerator or default_accelerator()
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("give accumulation to train(grad_accum=...), not to the Accelerator "
                         f"(it has gradient_accumulation_steps={accelerator.gradient_accumulation_steps})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    weight_fn = weight_fn or _default_weight
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup_steps, cosine))
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()
    device = accelerator.device
    stream = _batch_stream(batches, accelerator.process_index, accelerator.num_processes)
    result = TrainResult()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress or not accelerator.is_main_process)
    autocast = autocast_for(device, cpu_bfloat16)  # decided once (it reads the CPU's flags), entered per forward
    with seeded(seed), tf32_matmuls(device):
        for _ in bar:
            micro = [next(stream) for _ in range(grad_accum)]
            weights = [float(weight_fn(b)) for b in micro]
            total = float(accelerator.reduce(torch.tensor(sum(weights), device=device), "sum"))
            if not total > 0:
                raise ValueError("the step's batches hold nothing to average over (weight_fn gave 0 for "
                                 "every micro-batch): no label tokens?")
            loss_sum = 0.0
            for i, (batch, weight) in enumerate(zip(micro, weights)):
                last = i == len(micro) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
                    with autocast:
                        loss = loss_fn(wrapped, batch)
                    # DDP averages over processes, so each scales by processes / total weight
                    accelerator.backward(loss * (weight * accelerator.num_processes / total))
                loss_sum += loss.item() * weight
            norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_sum / sum(weights) if sum(weights) else float("nan"))
            result.units += sum(weights)
            result.grad_norms.append(float(norm))
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    result.seconds = time.perf_counter() - start
    result.steps = steps
    model.eval()
    return result


# ----------------------------------------------------------------------------- supervised batches

def response_labels(input_ids: torch.Tensor, prompt_lengths: Sequence[int],
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for SFT: the input ids, with prompt tokens and padding set to -100 (not learned)."""
    if input_ids.shape != attention_mask.shape or len(prompt_lengths) != input_ids.shape[0]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask "
                         f"{tuple(attention_mask.shape)} and {len(prompt_lengths)} prompt lengths disagree")
    labels = input_ids.clone()
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    labels[positions < torch.tensor(list(prompt_lengths)).unsqueeze(1)] = -100
    labels[attention_mask == 0] = -100
    return labels


def _chat_rows(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
               system: str | None = None) -> tuple[list[list[int]], list[int]]:
    """Each (prompt, response) as chat-template token ids, response + end-of-turn after the prompt,
    cut at `max_length`; and each row's prompt length."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many prompts and responses (> 0), got {len(prompts)} and {len(responses)}")
    ids, prompt_lengths = [], []
    for row, (head, response) in enumerate(zip(chat_prompts(tokenizer, prompts, system), responses)):
        head_ids = tokenizer(head, add_special_tokens=False).input_ids
        if len(head_ids) >= max_length:
            raise ValueError(f"prompt {row} takes {len(head_ids)} tokens in the chat template, so max_length="
                             f"{max_length} leaves no room for its response: raise max_length (or shorten the prompt)")
        tail_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False).input_ids
        ids.append((head_ids + tail_ids)[:max_length])
        prompt_lengths.append(len(head_ids))
    return ids, prompt_lengths


def sft_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int = 256,
              system: str | None = None) -> dict[str, torch.Tensor]:
    """A right-padded chat batch whose labels are the response tokens only (plus the end-of-turn).

    A row longer than `max_length` is cut there: its response is learned as far as it goes, without
    the end-of-turn (the model is not taught to stop mid-answer). A prompt that leaves no room for
    any response token is an error: that row would have nothing to learn.
    """
    ids, prompt_lengths = _chat_rows(tokenizer, prompts, responses, max_length, system)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        attention_mask[row, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": response_labels(input_ids, prompt_lengths, attention_mask)}


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def sft_batches(tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8,
                max_length: int = 256) -> list[dict[str, torch.Tensor]]:
    """The (prompt, response) pairs as `sft_batch`es of `batch_size` pairs each, in order."""
    _check_batch_size(batch_size)
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt (> 0), got {len(responses)} for {len(prompts)}")
    return [sft_batch(tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size], max_length)
            for i in range(0, len(prompts), batch_size)]


def packed_batches(tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8,
                   max_length: int = 256, row_length: int | None = None,
                   texts: Sequence[str] = ()) -> list[dict[str, torch.Tensor]]:
    """The pairs of `sft_batches` packed several to a row of `row_length` tokens (default: `max_length`)
    instead of one per padded row: the same tokens to learn in fewer, fuller rows (`pack_rows`). Plain
    `texts` may join them, each cut at `max_length` tokens, every token after its first learned."""
    _check_batch_size(batch_size)
    row_length = max_length if row_length is None else row_length
    if isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < max_length:
        raise ValueError(f"row_length must be an int >= max_length ({max_length}), got {row_length!r}")
    ids, unlabelled = _chat_rows(tokenizer, prompts, responses, max_length)
    text_ids = [tokenizer(text, add_special_tokens=True).input_ids[:max_length] for text in texts]
    if any(len(t) < 2 for t in text_ids):
        raise ValueError("every text needs at least two tokens (one to read, one to predict)")
    return pack_rows(ids + text_ids, unlabelled + [1] * len(text_ids), batch_size, row_length, tokenizer.pad_token_id)


def pack_rows(ids: Sequence[Sequence[int]], unlabelled: Sequence[int], batch_size: int, row_length: int,
              pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Token sequences (each at most `row_length` long, its first `unlabelled[i]` tokens not learned)
    packed into rows of `row_length` tokens, `batch_size` rows a batch.

    Rows are filled first-fit, longest sequence first (Krell et al. 2021, "Efficient sequence packing
    without cross-contamination"). `position_ids` restart at 0 for each sequence, which tells the model
    (transformers' packed-sequence masks) to keep them apart: no token attends across a boundary, so
    each is scored exactly as alone (tests/test_train.py). The end of a row is padding
    (`attention_mask` 0, labels −100).
    """
    if any(n < 1 for n in unlabelled):
        raise ValueError("every packed sequence needs its first token unlabelled: nothing before it in the row "
                         "may predict it")
    rows: list[list[int]] = []  # sequence indices per row
    room: list[int] = []
    for i in sorted(range(len(ids)), key=lambda i: -len(ids[i])):
        at = next((r for r, free in enumerate(room) if free >= len(ids[i])), None)
        if at is None:
            rows.append([])
            room.append(row_length)
            at = len(rows) - 1
        rows[at].append(i)
        room[at] -= len(ids[i])
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(row_length - room[start + r] for r in range(len(chunk)))
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        position_ids = torch.arange(width).repeat(len(chunk), 1)
        labels = torch.full_like(input_ids, -100)
        for r, in_row in enumerate(chunk):
            at = 0
            for i in in_row:
                n = len(ids[i])
                input_ids[r, at:at + n] = torch.tensor(ids[i])
                attention_mask[r, at:at + n] = 1
                position_ids[r, at:at + n] = torch.arange(n)
                labels[r, at + unlabelled[i]:at + n] = input_ids[r, at + unlabelled[i]:at + n]
                at += n
            position_ids[r, at:] = torch.arange(width - at)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                        "labels": labels})
    return batches


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100 (its weight in `train`:
    `label_tokens`). A batch without any label token is an error, not a NaN."""
    logits, targets = response_logits(model, batch)
    return F.cross_entropy(logits, targets)
