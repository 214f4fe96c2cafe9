"""The one training loop of the course (chapters 03-06): seeded, progress bar, LoRA or full.

Built on accelerate's `Accelerator`, so the same loop runs on a CPU, one GPU, or several GPUs
under `accelerate launch` (data-parallel: each process takes its own micro-batches, DDP averages
the gradients). Anything trainable fits: `loss_fn(model, batch) -> scalar loss` says what to learn
(SFT cross-entropy, a KD divergence, the DPO loss, ...).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .models import chat_prompts
from .runtime import seed_everything

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainResult:
    """What a run did: the loss after each optimizer step, wall time, steps taken."""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


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


def default_accelerator():
    """`Accelerator()`, except that several processes without CUDA (e.g. `accelerate launch
    --multi_gpu --num_processes 2` or `torchrun` on a CPU machine) get CPU data-parallel over gloo,
    where accelerate would otherwise run each process alone without saying so."""
    from accelerate import Accelerator

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several and not torch.cuda.is_available())


def train(model, loss_fn: Callable, batches: Sequence | Iterable, steps: int, lr: float = 1e-4,
          grad_accum: int = 1, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
          seed: int = 0, progress: bool = True, desc: str = "training", accelerator=None,
          warmup_steps: int = 0) -> TrainResult:
    """Minimize `loss_fn(model, batch)` for `steps` optimizer steps of `grad_accum` micro-batches.

    `batches` is a list (cycled) or an iterator (e.g. on-policy samples drawn as training goes).
    Only parameters with requires_grad train (LoRA: the adapters). `warmup_steps` ramps the
    learning rate linearly up to `lr` (short runs from a broken start diverge less). Trains `model`
    in place and leaves it in eval mode.
    """
    from tqdm.auto import tqdm

    if steps < 1 or grad_accum < 1:
        raise ValueError(f"steps and grad_accum must be at least 1, got {steps} and {grad_accum}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    seed_everything(seed)
    accelerator = accelerator or default_accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()
    stream = _batch_stream(batches, accelerator.process_index, accelerator.num_processes)
    result = TrainResult()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress or not accelerator.is_main_process)
    for _ in bar:
        total = 0.0
        for _ in range(grad_accum):
            loss = loss_fn(wrapped, next(stream)) / grad_accum
            accelerator.backward(loss)
            total += loss.item()
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
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


def sft_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int = 256,
              system: str | None = None) -> dict[str, torch.Tensor]:
    """A right-padded chat batch whose labels are the response tokens only (plus the end-of-turn)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many prompts and responses (> 0), got {len(prompts)} and {len(responses)}")
    heads = chat_prompts(tokenizer, prompts, system)
    ids, prompt_lengths = [], []
    for head, response in zip(heads, responses):
        head_ids = tokenizer(head, add_special_tokens=False).input_ids
        tail_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False).input_ids
        ids.append((head_ids + tail_ids)[:max_length])
        prompt_lengths.append(min(len(head_ids), max_length))
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        attention_mask[row, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": response_labels(input_ids, prompt_lengths, attention_mask)}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100)
