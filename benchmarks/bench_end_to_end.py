"""End to end: SmolLM2-135M quantized by the course, by torchao and bitsandbytes, and run by llama.cpp, in one run.

    python benchmarks/bench_end_to_end.py [--batch 8] [--prompt-tokens 128] [--decode-steps 16]
                                          [--repeats 5] [--threads N] [--no-memory] [--speedup eager|graph|compile]

Prefill: `--batch` sequences × `--prompt-tokens` tokens of human text read into the KV cache (logits
of the last position, as `generate` does). Decode: then `--decode-steps` greedy tokens for each
sequence. The course's models run through `course_lib.decoder` (fused q/k/v and gate/up, a static
cache; one C++ call a token on a CPU, CUDA graphs on a GPU; --speedup eager runs the steps op by op,
--speedup compile compiles them). With llama-cpp-python installed
(pip install -e ".[engines]") and --batch 1, llama.cpp runs the teacher's own Q4_1 GGUF and the
Q8_0 and F32 files its quantizer makes from it. Every variant is built first; the repeats are
interleaved (variant after variant, round after round), so a busy machine slows all of them alike;
each figure is the median of its repeats, reported as a ratio to the baseline (FP32 on a CPU, BF16
on CUDA). Peak memory: each variant again in a fresh process, the peak resident memory during one
prefill (CPU, Linux) or the peak CUDA memory allocated. Chapter 02 explains every variant.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from course_lib.engines import INSTALL_HINT, llama_cpp_available, llama_cpp_gguf, llama_cpp_speed
from course_lib.evaluate import Timing, decode_timing, human_corpus, prefill_timing, token_batch
from course_lib.int8_inference import (activation_absmax, quantize_model, quantize_with_bitsandbytes,
                                       quantize_with_torchao, smooth_model)
from course_lib.models import load_teacher, weight_bytes
from course_lib.runtime import pick_device, seed_everything

CALIBRATION_TEXTS = 16  # taken from the end of the corpus; the prompts come from its start


def _smoothquant(model, tokenizer):
    smooth_model(model, activation_absmax(model, tokenizer, human_corpus()[-CALIBRATION_TEXTS:]), alpha=0.5)
    quantize_model(model, "w8a8")


VARIANTS = {
    "course W8A16": lambda m, t: quantize_model(m, "w8a16"),
    "course W8A16, lm_head too": lambda m, t: quantize_model(m, "w8a16", include_lm_head=True),
    "course W8A8": lambda m, t: quantize_model(m, "w8a8"),
    "course W8A8, lm_head too": lambda m, t: quantize_model(m, "w8a8", include_lm_head=True),
    "course W4A16": lambda m, t: quantize_model(m, "w4a16"),
    "course W8A8+SmoothQuant": _smoothquant,
    "course W8A8+LLM.int8": lambda m, t: quantize_model(m, "w8a8", outlier_threshold=6.0),
    "torchao W8A8": lambda m, t: quantize_with_torchao(m, "w8a8"),
    "torchao W8A16": lambda m, t: quantize_with_torchao(m, "w8a16"),
    "bitsandbytes LLM.int8 (6.0)": lambda m, t: quantize_with_bitsandbytes(m, 6.0),
}


def baseline_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def random_teacher(dtype: torch.dtype, device: torch.device):
    """SmolLM2-135M's architecture with random weights, for machines without the teacher (speed only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval(), None


def build(name: str, device: torch.device, random_weights: bool = False, own_memory: bool = False):
    """(model, tokenizer) of one variant; 'FP32' and 'BF16' are the unquantized model. With
    `own_memory`, the weights are first copied out of the checkpoint's memory map (see peak_memory)."""
    dtype = {"FP32": torch.float32, "BF16": torch.bfloat16}.get(name, baseline_dtype(device))
    model, tokenizer = random_teacher(dtype, device) if random_weights else load_teacher(dtype=dtype, device=device)
    if own_memory:
        copy_out_of_memory_map(model)
    if name in VARIANTS:
        VARIANTS[name](model, tokenizer)
    return model, tokenizer


def copy_out_of_memory_map(model) -> None:
    """Give every parameter its own memory (tied ones stay tied): weights loaded from safetensors
    can live in the file's memory map, whose pages stay resident while any tensor uses the file."""
    copies = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and type(param) is torch.nn.Parameter:
                if id(param) not in copies:
                    copies[id(param)] = torch.nn.Parameter(param.data.clone(), requires_grad=param.requires_grad)
                module._parameters[name] = copies[id(param)]
    gc.collect()


def variant_names(device: torch.device, chosen: list[str] | None, random_weights: bool = False) -> list[str]:
    names = (["BF16", "FP32"] if device.type == "cuda" else ["FP32", "BF16"]) + list(VARIANTS)  # baseline first
    for name in list(names):
        package = name.split()[0]
        if package in ("torchao", "bitsandbytes"):
            try:
                importlib.import_module(package)
            except Exception as error:  # not installed, or built for another torch
                print(f"{package} unavailable ({type(error).__name__}: {error}): skipping {name!r}", file=sys.stderr)
                names.remove(name)
    if random_weights:  # SmoothQuant calibrates on text; its speed is W8A8's anyway
        names.remove("course W8A8+SmoothQuant")
    if chosen:
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {names}")
        names = [n for n in names if n in chosen or n == names[0]]
    return names


def prompts(tokenizer, device, batch: int = 8, length: int = 128) -> torch.Tensor:
    """batch x length tokens of human text (random token ids without a tokenizer)."""
    if tokenizer is None:
        return torch.randint(0, 49152, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    return token_batch(tokenizer, human_corpus(), batch_size=batch, length=length).to(device)


def peak_memory(name: str, device: torch.device, random_weights: bool = False) -> float:
    """MiB at the peak of one prefill of `name`, measured in this (fresh) process: on a CPU the
    resident memory of the whole process (weights, activations, and Python/torch themselves), with
    the weights out of the memory map and glibc returning freed blocks (see the subprocess' env)."""
    model, tokenizer = build(name, device, random_weights, own_memory=device.type == "cpu")
    ids = prompts(tokenizer, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        prefill_timing(model, ids, repeats=1, warmup=0)
        return torch.cuda.max_memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the high-water mark here
    prefill_timing(model, ids, repeats=1, warmup=0)
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_memory_in_subprocess(name: str, threads: int, random_weights: bool) -> float | None:
    command = [sys.executable, __file__, "--peak-memory-of", name, "--threads", str(threads)]
    command += ["--random-weights"] if random_weights else []
    # large blocks from mmap, so that memory freed by quantization really leaves the process
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"  (peak memory of {name} failed: {result.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


LLAMA_CPP_FILES = ("F32", "Q8_0", "Q4_1")


def run(args) -> list[dict]:
    device = pick_device()
    names = variant_names(device, args.variants, args.random_weights)
    models = {}
    for name in names:
        print(f"building {name} ...", file=sys.stderr, flush=True)
        models[name], tokenizer = build(name, device, args.random_weights)
    ids = prompts(tokenizer, device, args.batch, args.prompt_tokens)
    engines = {}
    if args.batch == 1 and device.type == "cpu" and not args.random_weights:
        if llama_cpp_available():
            engines = {f"llama.cpp {kind}": llama_cpp_gguf(kind) for kind in LLAMA_CPP_FILES}
        else:
            print(f"{INSTALL_HINT}: no llama.cpp rows", file=sys.stderr)
    times = {name: {"prefill": [], "decode": []} for name in [*names, *engines]}
    for round_ in range(args.repeats + 1):  # round 0 warms everything up
        for name, model in models.items():
            prefill = prefill_timing(model, ids, repeats=1, warmup=0).median
            decode = decode_timing(model, ids, args.decode_steps, repeats=1, warmup=0, speedup=args.speedup).median
            if round_:
                times[name]["prefill"].append(prefill), times[name]["decode"].append(decode)
        for name, path in engines.items():
            timing = llama_cpp_speed(path, ids[0].cpu(), args.decode_steps, repeats=1, warmup=0)
            if round_:
                times[name]["prefill"].append(timing["prefill"].median)
                times[name]["decode"].append(timing["decode"].median)
    timings = {name: {phase: Timing.from_times(ts) for phase, ts in phases.items()} for name, phases in times.items()}
    base = names[0]
    rows = []
    for name in timings:
        prefill, decode = timings[name]["prefill"].median, timings[name]["decode"].median
        rows.append({"variant": name, "prefill_s": prefill, "decode_s": decode,
                     "prefill_tok_s": ids.numel() / prefill,
                     "decode_tok_s": ids.shape[0] * args.decode_steps / decode,
                     "prefill_speedup": timings[base]["prefill"].median / prefill,
                     "decode_speedup": timings[base]["decode"].median / decode,
                     "stored_mib": (weight_bytes(models[name]) if name in models else engines[name].stat().st_size) / 2**20})
    if args.memory:
        del models
        gc.collect()
        for row in rows:
            if not row["variant"].startswith("llama.cpp"):
                row["peak_mib"] = peak_memory_in_subprocess(row["variant"], args.threads, args.random_weights)
    return rows


def print_table(rows: list[dict], device: torch.device, args) -> None:
    weights = "random weights, " if args.random_weights else ""
    print(f"\ndevice: {device} ({torch.get_num_threads()} threads), {weights}prefill {args.batch}x{args.prompt_tokens}, "
          f"decode {args.batch}x{args.decode_steps}, "
          f"median of {args.repeats} interleaved repeats; speedup = baseline time / variant time; "
          f"peak = {'peak CUDA memory allocated' if device.type == 'cuda' else 'peak resident memory of the whole process'} "
          f"during one prefill")
    head = f"{'variant':30s} {'prefill tok/s':>14s} {'speedup':>8s} {'decode tok/s':>13s} {'speedup':>8s} {'stored MiB':>11s} {'peak MiB':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        peak = f"{r['peak_mib']:9.0f}" if r.get("peak_mib") else f"{'-':>9s}"
        print(f"{r['variant']:30s} {r['prefill_tok_s']:14.0f} {r['prefill_speedup']:7.2f}x {r['decode_tok_s']:13.1f} "
              f"{r['decode_speedup']:7.2f}x {r['stored_mib']:11.1f} {peak}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="sequences (llama.cpp runs at --batch 1)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--speedup", choices=["fused", "eager", "graph", "compile"], default=None,
                        help="how decode steps run (default: CUDA graphs on a GPU, the fused C++ step on a CPU)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--variants", nargs="*", help="only these (the baseline always runs)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--random-weights", action="store_true",
                        help="the teacher's architecture with random weights (speed only; for machines "
                             "that cannot fetch the teacher)")
    parser.add_argument("--peak-memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    if args.peak_memory_of:
        print(json.dumps({"peak_mib": peak_memory(args.peak_memory_of, pick_device(), args.random_weights)}))
        return 0
    rows = run(args)
    print_table(rows, pick_device(), args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
