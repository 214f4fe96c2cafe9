"""course_lib.roofline, course_lib.crossover, course_lib.engines and benchmarks/gpu_check.py on a CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib.crossover import crossover_width, int8_crossover, llama_shaped, plot_crossover
from course_lib.engines import INSTALL_HINT, llama_cpp_available, llama_cpp_gguf, llama_cpp_speed
from course_lib.int8_inference import quantize_model
from course_lib.models import weight_bytes
from course_lib.roofline import (decode_bytes_per_token, matmul_peak, memory_bandwidth, plot_roofline,
                                 roofline_rows)

ROOT = Path(__file__).resolve().parents[1]


def test_limits_are_measured_and_checked():
    assert memory_bandwidth(mib=64, repeats=1) > 1e8
    assert matmul_peak("fp32", size=64, repeats=1) > 1e6 and matmul_peak("int8", size=64, repeats=1) > 1e6
    with pytest.raises(ValueError, match="kind"):
        matmul_peak("fp8")
    with pytest.raises(ValueError, match="mib"):
        memory_bandwidth(mib=1)


def test_bytes_per_token_counts_what_decode_reads():
    model = llama_shaped(64, n_layers=1, vocab=96)
    embedding = model.model.embed_tokens.weight
    assert decode_bytes_per_token(model) == weight_bytes(model)  # tied float head: reads the whole table
    quantize_model(model, "w8a8", include_lm_head=True)
    assert decode_bytes_per_token(model) == weight_bytes(model) - embedding.numel() * 4
    rows = roofline_rows({"a": {"bytes per token": 1e6, "decode tok/s": 50.0}}, bandwidth=1e8)
    assert rows[0]["limit tok/s"] == 100 and rows[0]["of the limit"] == 0.5
    plot_roofline(rows, 1e8)


def test_crossover_runs_at_tiny_widths_on_a_cpu():
    rows = int8_crossover(widths=(64, 128), device="cpu", steps=2, repeats=1, n_layers=1)
    assert [r["width"] for r in rows] == [64, 128] and rows[0]["baseline"] == "FP32"
    assert all(r["w8a8 tok/s"] > 0 and r["w8a16 speedup"] > 0 for r in rows)
    plot_crossover(rows)
    fake = [{"width": w, "w8a8 speedup": s} for w, s in [(576, 0.5), (1024, 1.2), (2048, 0.9), (4096, 1.5)]]
    assert crossover_width(fake) == 4096
    assert crossover_width(fake[:2]) == 1024 and crossover_width(fake[:1]) is None
    with pytest.raises(ValueError, match="multiple of 64"):
        llama_shaped(100)


def test_gpu_check_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: benchmarks/gpu_check.py runs for real")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "no CUDA GPU" in result.stdout
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    names = [name for name, _, _ in gpu_check.steps(type("Args", (), {"quick": True})())]
    assert names[0] == "cuda tests" and any(n.startswith("crossover") for n in names)


def test_llama_cpp_is_optional():
    if llama_cpp_available():
        pytest.skip("llama-cpp-python is installed: test_llama_cpp_greedy_tokens_match_the_course_decoder covers it")
    with pytest.raises(ModuleNotFoundError, match="engines"):
        llama_cpp_speed("missing.gguf", [1, 2, 3])
    assert "pip install" in INSTALL_HINT
    with pytest.raises(ValueError, match="kind"):
        llama_cpp_gguf("Q2_K")


def test_the_quantizers_c_output_goes_to_its_log_not_the_notebook(tmp_path, capfd):
    from course_lib.engines import _c_output_to

    with _c_output_to(tmp_path / "q.log"):
        os.write(1, b"llama_model_loader: to stdout\n")
        os.write(2, b"converting to f32 .. to stderr\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"
    assert (tmp_path / "q.log").read_bytes() == b"llama_model_loader: to stdout\nconverting to f32 .. to stderr\n"


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_match_the_course_decoder(teacher):
    """The same weights (llama.cpp's F32 file holds the Q4_1 weights exactly), the same prompt: the
    same greedy continuation from llama.cpp and from course_lib.decoder."""
    if not llama_cpp_available():
        pytest.skip(INSTALL_HINT)
    from course_lib.decoder import Decoder
    from course_lib.evaluate import human_corpus, token_batch

    model, tokenizer = teacher
    ids = token_batch(tokenizer, human_corpus(), 1, 32)
    ours = Decoder(model, 1, 48).greedy(ids, 8)[0].tolist()
    run = llama_cpp_speed(llama_cpp_gguf("F32"), ids[0], new_tokens=8, repeats=1, warmup=0)
    assert run["prefill"].median > 0 and run["decode"].median > 0
    assert run["tokens"] == ours
    # Q4_1 as llama.cpp runs it quantizes the activations too (to 8 bits): it need not agree token for token
    assert len(llama_cpp_speed(llama_cpp_gguf("Q4_1"), ids[0], new_tokens=2, repeats=1, warmup=0)["tokens"]) == 2
