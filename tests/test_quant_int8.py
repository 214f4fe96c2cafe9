"""course_lib.int8_inference: INT8/INT4 layers, quantize_model, SmoothQuant, timing (chapter 02)."""
import copy

import pytest
import torch
from torch import nn

from course_lib import kernels
from course_lib.evaluate import decode_timing, prefill_timing, token_batch
from course_lib.int8_inference import (Int4Linear, Int8Linear, activation_absmax, pack_int4, quantize_model,
                                       smooth_model, smoothing_scales, unpack_int4)
from course_lib.models import count_parameters
from course_lib.quant import absmax_quantize, dequantize, relative_error

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(k=64, n=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_close_to_the_float_layer(mode, bias):
    linear = _linear(bias=bias)
    layer = Int8Linear.from_float(linear, mode)
    x = torch.randn(2, 5, 64)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (48, 64)
    assert relative_error(linear(x), layer(x)) < 0.02
    assert layer(x).shape == (2, 5, 48) and layer(x).dtype == torch.float32


def test_w8a16_is_the_float_matmul_with_dequantized_weights():
    linear = _linear()
    layer = Int8Linear.from_float(linear, "w8a16")
    q, scale = absmax_quantize(linear.weight.detach(), 8, dim=-1)
    x = torch.randn(7, 64)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
    assert torch.allclose(layer(x), x @ (q.float() * scale).t() + linear.bias, atol=1e-6)


@pytest.fixture(params=["kernels", "torch"])
def matmul_path(request, monkeypatch):
    """Run a test on the compiled loops (skipped where they cannot be built) and on plain torch."""
    if request.param == "kernels" and not kernels.available():
        pytest.skip("the course's CPU kernels could not be compiled here")
    if request.param == "torch":
        monkeypatch.setattr(kernels, "_fast", lambda x: False)
    return request.param


@pytest.mark.parametrize("int8_gemm", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("k", [64, 100])  # 100: 32 INT8 pairs a step, then 4 by the plain loop
def test_w8a8_is_the_by_hand_int8_product_exactly(matmul_path, rows, int8_gemm, k):
    layer = Int8Linear.from_float(_linear(k=k, n=50), "w8a8")  # 50 rows: not a multiple of 4
    layer.int8_gemm = int8_gemm  # False: a CPU without INT8 dot products sums them in a float32 GEMM
    x = torch.randn(rows, k)
    x[0] *= 1e-30  # a tiny token gets the floor, not an infinite scale
    with torch.no_grad():
        y = layer(x)
    # by hand, as the notebook teaches: per-token absmax, exact int32 product, one dequantization
    x_q, x_scale = absmax_quantize(x, 8, dim=-1)
    exact = (x_q.long() @ layer.weight.long().t()).float() * x_scale * layer.weight_scale.view(1, -1)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, exact + layer.bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("k, n", [(96, 42), (4096, 300)])  # 4096 x 300: prefill in blocks of 64 rows, a last shorter one
def test_w8a16_and_w4a16_match_the_dequantized_reference(matmul_path, rows, k, n):
    linear = _linear(k=k, n=n)
    x = torch.randn(rows, k)
    int8 = Int8Linear.from_float(linear, "w8a16")
    int4 = Int4Linear.from_float(linear, group_size=32)
    with torch.no_grad():
        ref8 = torch.nn.functional.linear(x, dequantize(int8.weight, int8.weight_scale), int8.bias)
        ref4 = torch.nn.functional.linear(x, dequantize(unpack_int4(int4.packed), int4.weight_scale), int4.bias)
        assert torch.allclose(int8(x), ref8, rtol=1e-5, atol=1e-5)
        assert torch.allclose(int4(x), ref4, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 7, 16])
@pytest.mark.parametrize("k", [64, 100])  # 100: a last step of 4 floats (a masked load)
def test_the_few_rows_float_loop_is_the_float_matmul(rows, k):
    if not kernels.available():
        pytest.skip("the course's CPU kernels could not be compiled here")
    x, w = torch.randn(rows, k), torch.randn(50, k)  # 50 weight rows: not a multiple of 4
    assert torch.allclose(torch.ops.course_kernels.float_few_rows_matmul(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.course_kernels.float_few_rows_matmul(torch.randn(17, k), w)


@pytest.mark.parametrize("group_size", [2, 24, 32, 192])  # bytes a group: 1, 12, 16, 6 x 16 (AVX-512: whole 16s)
@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_w4a16_matches_the_dequantized_reference_for_any_group_size(matmul_path, group_size, rows):
    linear = _linear(k=576, n=42)
    x = torch.randn(rows, 576)
    int4 = Int4Linear.from_float(linear, group_size=group_size)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, dequantize(unpack_int4(int4.packed), int4.weight_scale), int4.bias)
        assert torch.allclose(int4(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outlier_threshold", [None, 2.0])  # 2.0: LLM.int8(), with outlier columns in this x
def test_w8a8_prefill_without_int8_dot_products_never_calls_the_int8_gemm(monkeypatch, outlier_threshold):
    layer = Int8Linear.from_float(_linear(), "w8a8", outlier_threshold=outlier_threshold)
    assert layer.int8_gemm == kernels.cpu_has_int8_dot_products()  # decided when the layer is built
    fused = Int8Linear.concat([layer, layer])
    assert fused.int8_gemm == layer.int8_gemm
    x = torch.randn(40, 64)
    layer.int8_gemm = True
    with torch.no_grad():
        expected = layer(x)
    layer.int8_gemm = False
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: pytest.fail("no INT8 GEMM on this CPU"))
    with torch.no_grad():  # the same integer products, summed by the float32 GEMM: the same outputs
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_w8a16_does_not_use_int_mm(monkeypatch):
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: pytest.fail("W8A16 must not quantize activations"))
    Int8Linear.from_float(_linear(), "w8a16")(torch.randn(2, 64))


def test_concat_gives_the_same_outputs_as_separate_layers(matmul_path):
    x = torch.randn(3, 64)
    for make in (lambda s: Int8Linear.from_float(_linear(seed=s), "w8a8"),
                 lambda s: Int8Linear.from_float(_linear(seed=s), "w8a16", granularity="tensor"),
                 lambda s: Int4Linear.from_float(_linear(seed=s, bias=s == 1), 16)):
        layers = [make(s) for s in range(3)]
        fused = type(layers[0]).concat(layers)
        with torch.no_grad():
            assert torch.allclose(fused(x), torch.cat([layer(x) for layer in layers], -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="concat"):
        Int8Linear.concat([Int8Linear.from_float(_linear(), "w8a8"), Int8Linear.from_float(_linear(), "w8a16")])


def test_scales_stay_float32_when_the_model_is_cast_to_bf16():
    model = _tiny_llama()
    quantize_model(model, "w8a16")
    model.to(torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight_scale.dtype == torch.float32 and layer.weight.dtype == torch.int8
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    int4 = Int4Linear.from_float(_linear(), 16).to(torch.bfloat16)
    assert int4.weight_scale.dtype == torch.float32 and int4.bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.randint(0, 96, (1, 5))).logits.dtype == torch.bfloat16


def test_int4_linear_handles_a_bias_under_bf16():
    linear = _linear()
    layer = Int4Linear.from_float(linear, 16)  # float32 bias, bfloat16 input
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(linear(x.float()), y.float()) < 0.2


def test_count_parameters_counts_quantized_weights():
    model = _tiny_llama()
    before = count_parameters(model)
    for mode in ("w8a8", "w4a16"):
        quantized = copy.deepcopy(model)
        quantize_model(quantized, mode)
        assert count_parameters(quantized) == before
    assert count_parameters(quantized, trainable_only=True) < before


def test_outlier_path_recovers_an_outlier_feature():
    linear = _linear()
    x = torch.randn(16, 64)
    x[:, 9] = 300.0  # one massive feature, as in the teacher's MLP inputs
    with torch.no_grad():
        weights_only = Int8Linear.from_float(linear, "w8a16")(x)  # the same weights, float activations
        plain = Int8Linear.from_float(linear, "w8a8")(x)
        decomposed = Int8Linear.from_float(linear, "w8a8", outlier_threshold=6.0)(x)
    # per-token scales of ~300/127 wipe out every normal feature; LLM.int8() keeps them
    assert relative_error(weights_only, plain) > 10 * relative_error(weights_only, decomposed)


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
@pytest.mark.parametrize("rows", [1, 40])
def test_a_per_tensor_scale_gives_the_per_tensor_reference(matmul_path, mode, rows):
    layer = Int8Linear.from_float(_linear(), mode, granularity="tensor")  # one scale: the kernel broadcasts it
    x = torch.randn(rows, layer.in_features)
    w = dequantize(layer.weight, layer.weight_scale)
    with torch.no_grad():
        if mode == "w8a16":
            expected = torch.nn.functional.linear(x, w, layer.bias)
        else:
            x_q, x_scale = absmax_quantize(x, 8, dim=-1)
            expected = (x_q.long() @ layer.weight.long().t()).float() * x_scale * layer.weight_scale + layer.bias
        assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_per_tensor_scale_and_bad_arguments():
    layer = Int8Linear.from_float(_linear(), "w8a16", granularity="tensor")
    assert layer.weight_scale.shape == ()
    with pytest.raises(ValueError, match="mode"):
        Int8Linear.from_float(_linear(), "w4a4")
    with pytest.raises(ValueError, match="granularity"):
        Int8Linear.from_float(_linear(), granularity="row")
    with pytest.raises(ValueError, match="outlier_threshold"):
        Int8Linear.from_float(_linear(), "w8a16", outlier_threshold=6.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(2, 2, 1))


def test_pack_int4_round_trip_and_int4_linear():
    q = torch.randint(-8, 8, (5, 32), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 16)
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0].item() == (q[0, 0].item() + 8) | ((q[0, 1].item() + 8) << 4)
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 4), 9, dtype=torch.int8))
    linear = _linear()
    layer = Int4Linear.from_float(linear, group_size=16)
    x = torch.randn(3, 64)
    assert layer.weight_scale.shape == (48, 4)
    assert relative_error(linear(x), layer(x)) < 0.15



def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("mode, layer_type", [("w8a16", Int8Linear), ("w8a8", Int8Linear), ("w4a16", Int4Linear)])
def test_quantize_model_swaps_layers_and_reports_bytes(mode, layer_type):
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        report = quantize_model(model, mode, **({"group_size": 32} if mode == "w4a16" else {}))
        after = model(ids).logits
    assert len(report.layers) == 14 and "lm_head" not in report.layers
    assert all(isinstance(model.get_submodule(name), layer_type) for name in report.layers)
    assert isinstance(model.lm_head, nn.Linear)
    assert report.bytes_before == 4 * sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                                          for n in report.layers)
    assert report.ratio > (3.5 if mode != "w4a16" else 5.5)
    assert relative_error(before, after) < (0.05 if mode != "w4a16" else 0.2)
    assert "smaller" in str(report)


def test_quantize_model_can_take_the_head_and_rejects_unknown_modes():
    model = _tiny_llama()
    report = quantize_model(model, "w8a8", include_lm_head=True)
    assert "lm_head" in report.layers and isinstance(model.lm_head, Int8Linear)
    with pytest.raises(ValueError, match="mode"):
        quantize_model(_tiny_llama(), "int3")


def test_smoothing_scales_formula():
    x_absmax = torch.tensor([4.0, 1.0, 100.0])
    w = torch.tensor([[1.0, -0.25, 0.01], [0.5, 0.25, -0.04]])
    s = smoothing_scales(x_absmax, [w], alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 2.0, 50.0]))
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(x_absmax, [w], alpha=1.5)


def test_smooth_model_keeps_the_float_function_and_flattens_outliers(teacher_free_tokenizer):
    model = _tiny_llama()
    with torch.no_grad():  # plant an outlier channel feeding the MLP, as real models have
        model.model.layers[0].post_attention_layernorm.weight[3] = 40.0
    ids = torch.randint(0, 96, (2, 10))
    texts = ["a b c d e f g h", "h g f e d c b a a"]
    absmax = activation_absmax(model, teacher_free_tokenizer, texts)
    assert set(absmax) >= {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"}
    smoothed = copy.deepcopy(model)
    assert smooth_model(smoothed, absmax, alpha=0.5) == 6
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, smoothed(ids).logits, atol=1e-4)
    after = activation_absmax(smoothed, teacher_free_tokenizer, texts)["model.layers.0.mlp.gate_proj"]
    before = absmax["model.layers.0.mlp.gate_proj"]
    assert after.max() / after.median() < before.max() / before.median()
    with pytest.raises(KeyError, match="calibration"):
        smooth_model(copy.deepcopy(model), {}, 0.5)


@pytest.fixture
def teacher_free_tokenizer():
    """A character-level stand-in tokenizer (ids < 96) for the tiny model, no files needed."""
    class CharTokenizer:
        padding_side = "right"
        pad_token_id = 0

        def __call__(self, texts, return_tensors=None, padding=False, truncation=False, max_length=None,
                     padding_side="right", add_special_tokens=True, **kwargs):  # the keywords course_lib passes
            rows = [[1 + ord(c) % 95 for c in t][:max_length] for t in texts]
            if return_tensors is None:
                return {"input_ids": rows}
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            return _Batch(input_ids=ids, attention_mask=mask)

    return CharTokenizer()


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})

    def __getattr__(self, key):
        return self[key]


def test_token_batch_and_timings(teacher_free_tokenizer):
    ids = token_batch(teacher_free_tokenizer, ["short", "a long enough text", "another long text"], 2, 8)
    assert ids.shape == (2, 8)
    with pytest.raises(ValueError, match="need 3"):
        token_batch(teacher_free_tokenizer, ["short", "a long enough text"], 3, 8)
    model = _tiny_llama()
    prefill = prefill_timing(model, ids, repeats=2, warmup=0)
    decode = decode_timing(model, ids, steps=3, repeats=2, warmup=0)
    assert len(prefill.times) == len(decode.times) == 2 and prefill.median > 0 and decode.median > 0
    with pytest.raises(ValueError, match="steps"):
        decode_timing(model, ids, steps=0)


@pytest.mark.slow
def test_teacher_w8a8_close_to_fp32_and_smaller(teacher):
    from course_lib.evaluate import human_corpus, perplexity
    from course_lib.models import weight_bytes

    model, tokenizer = teacher
    texts = human_corpus(4)
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, "w8a8")
    assert len(report.layers) == 210 and report.ratio >= 3.9
    assert weight_bytes(quantized) < weight_bytes(model) / 1.9  # the FP32 embedding stays
    fp32 = perplexity(model, tokenizer, texts, max_length=64)
    w8a8 = perplexity(quantized, tokenizer, texts, max_length=64)
    assert w8a8 / fp32 < 1.1


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 8, 17, 40])
def test_int8_matmul_pads_to_cuda_shape_rules(m):
    from course_lib.quant import int8_matmul

    a = torch.randint(-128, 128, (m, 60), dtype=torch.int8, device="cuda")
    w = torch.randint(-128, 128, (36, 60), dtype=torch.int8, device="cuda")
    exact = (a.cpu().long() @ w.cpu().long().t()).int()
    for b in (w.t(), w.t().contiguous()):  # column-major (as Int8Linear passes it) and row-major
        c = int8_matmul(a, b)
        assert c.dtype == torch.int32 and c.shape == (m, 36)
        assert torch.equal(c.cpu(), exact)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_int8_linear_on_cuda_bf16(mode):
    linear = _linear().cuda().to(torch.bfloat16)
    layer = Int8Linear.from_float(linear, mode, outlier_threshold=6.0 if mode == "w8a8" else None)
    x = torch.randn(4, 9, 64, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
    assert relative_error(linear(x).float(), y.float()) < 0.03
    cpu = Int8Linear.from_float(linear.float().cpu(), mode)
    assert torch.equal(cpu.weight, layer.weight.cpu())


@cuda
@pytest.mark.cuda
def test_quantized_tiny_model_runs_on_cuda():
    model = _tiny_llama().cuda()
    ids = torch.randint(0, 96, (2, 12), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        quantize_model(model, "w8a8")
        after = model(ids).logits
    assert relative_error(before, after) < 0.05


def test_activation_absmax_ignores_padding(teacher_free_tokenizer):
    model = _tiny_llama()
    with torch.no_grad():  # the padding token's embedding is huge: it must not reach the statistics
        model.model.embed_tokens.weight[0] = 1e4
    texts = ["a b c d e f g h i j k", "short"]
    padded = activation_absmax(model, teacher_free_tokenizer, texts, batch_size=2)
    alone = [activation_absmax(model, teacher_free_tokenizer, [t], batch_size=1) for t in texts]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.allclose(padded[name], torch.maximum(alone[0][name], alone[1][name]), rtol=1e-4, atol=1e-5)
        assert padded[name].max() < 1e3


def test_quantize_model_checks_every_layer_before_swapping_any():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, "w4a16", group_size=128)  # divides 64? no: nothing may be swapped
    assert not any(isinstance(m, Int4Linear) for m in model.modules())


@pytest.mark.slow
def test_teacher_perplexity_of_each_scheme_matches_its_plain_reference(teacher):
    """The fast kernels change no math: every scheme's perplexity within 0.1 % of the plain
    reference the notebook teaches (dequantized weights in an nn.Linear; W8A8 by torch operations),
    and W8A16 within 0.5 % of FP32."""
    from course_lib.evaluate import human_corpus, perplexity

    model, tokenizer = teacher
    texts = human_corpus(4)
    fp32 = perplexity(model, tokenizer, texts, max_length=64)
    for mode in ("w8a16", "w8a8", "w4a16"):
        quantized = copy.deepcopy(model)
        report = quantize_model(quantized, mode)
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for name in report.layers:
                layer, linear = quantized.get_submodule(name), reference.get_submodule(name)
                q = unpack_int4(layer.packed) if mode == "w4a16" else layer.weight
                linear.weight.copy_(dequantize(q, layer.weight_scale))
        ours = perplexity(quantized, tokenizer, texts, max_length=64)
        if mode == "w8a8":  # activations quantized too: the reference is the same math in torch operations
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(kernels, "_fast", lambda x: False)
                plain = perplexity(quantized, tokenizer, texts, max_length=64)
        else:
            plain = perplexity(reference, tokenizer, texts, max_length=64)
        assert abs(ours / plain - 1) < 1e-3, (mode, ours, plain)
        if mode == "w8a16":
            assert ours / fp32 - 1 < 0.005


def test_a_plain_install_ships_the_kernel_sources():
    """A non-editable install compiles the kernels from the installed sources: pyproject's
    package-data must name every file beside kernels/__init__.py."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(kernels.__file__).parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["course_lib"]
    package = Path(kernels.__file__).parents[1]
    sources = [p for p in Path(kernels.__file__).parent.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert set(kernels.SOURCES) | set(kernels.HEADERS) <= set(sources) and len(kernels.SOURCES) == 2
    assert all(any(p.relative_to(package).match(glob) for glob in globs) for p in sources)
