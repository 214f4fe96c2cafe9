"""course_lib.decoder: the lean decode loop agrees with transformers on float, quantized and LoRA models."""
import copy

import pytest
import torch

from course_lib import kernels
from course_lib.decoder import Decoder, fuse, supports
from course_lib.evaluate import Timing, decode_timing, prefill_timing
from course_lib.int8_inference import Int8Linear, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _prompts(batch=3):
    ids = torch.randint(1, 96, (batch, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generate pads
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("mode", [None, "w8a16", "w8a8", "w4a16"])
def test_decoder_matches_transformers(mode):
    model = _tiny_llama()
    if mode:
        quantize_model(model, mode)
    ids, mask = _prompts()
    decoder = Decoder(model, 3, 20)
    # W8A8: an activation one rounding apart (another attention kernel) can land on the next INT8 step
    atol = 2e-3 if mode == "w8a8" else 1e-4
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits[:, -1]
        assert torch.allclose(decoder.prefill(ids, mask), reference, atol=atol)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(decoder.greedy(ids, 8, mask), expected[:, 10:])


def test_fused_projections_quantize_each_activation_once(monkeypatch):
    import course_lib.int8_inference as module

    model = _tiny_llama()
    quantize_model(model, "w8a8")
    calls = []
    real = module.int8_dynamic_linear
    monkeypatch.setattr(module, "int8_dynamic_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    decoder = Decoder(model, 1, 8, speedup="eager")  # the step op by op, in Python
    decoder.prefill(torch.randint(0, 96, (1, 4)))
    calls.clear()
    decoder.step(torch.tensor([[5]]))
    # per layer: q/k/v fused (64 + 32 + 32 rows), o, gate/up fused (128 + 128), down: 4 calls, not 7
    assert len(calls) == 2 * 4
    assert calls[0] == (128, 64) and calls[2] == (256, 64)


def test_decoder_rebuilds_when_the_model_changes():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    decoder = Decoder(model, 1, 10)
    before = decoder.prefill(ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(3)  # in place: a training step does this
        expected = model(ids).logits[:, -1]
    assert not torch.allclose(before, expected)
    assert torch.allclose(decoder.prefill(ids), expected, atol=1e-4)
    quantize_model(model, "w8a16")  # layers swapped
    with torch.no_grad():
        assert torch.allclose(decoder.prefill(ids), model(ids).logits[:, -1], atol=1e-4)


def test_fused_layers_are_built_once_and_kept_on_the_model():
    import copy

    from course_lib.decoder import KEPT

    model = _tiny_llama()
    first = Decoder(model, 1, 10)
    assert Decoder(model, 2, 12).layers[0]["qkv"] is first.layers[0]["qkv"]  # no second copy of the weights
    assert KEPT not in dict(model.named_modules()) and not any(KEPT in k for k in model.state_dict())
    twin = copy.deepcopy(model)  # a copy starts without them: its own weights get their own fused layers
    assert Decoder(twin, 1, 10).layers[0]["qkv"] is not first.layers[0]["qkv"]
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1)
    assert Decoder(model, 1, 10).layers[0]["gate_up"] is not first.layers[0]["gate_up"]
    model.to(torch.float64)  # new tensors, new fused layers (the cache in the new dtype)
    assert Decoder(model, 1, 10).layers[0]["qkv"].weight.dtype == torch.float64


def test_decoder_runs_lora_layers_unfused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                     init_lora_weights=False)).eval()
    ids, mask = _prompts()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert supports(model) == (True, "")
    assert torch.allclose(Decoder(model, 3, 16).prefill(ids, mask), expected, atol=1e-4)


def test_fuse_and_what_the_decoder_does_not_support():
    model = _tiny_llama()
    attn = model.model.layers[0].self_attn
    fused = fuse([attn.q_proj, attn.k_proj])
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(fused(x), torch.cat([attn.q_proj(x), attn.k_proj(x)], -1))
    assert fuse([attn.q_proj, Int8Linear.from_float(attn.k_proj)]) is None
    assert not supports(torch.nn.Linear(2, 2))[0]
    assert "training" in supports(_tiny_llama().train())[1]
    with pytest.raises(ValueError, match="cannot run"):
        Decoder(torch.nn.Linear(2, 2), 1, 4)
    with pytest.raises(ValueError, match="input_ids"):
        Decoder(model, 2, 8).prefill(torch.zeros(1, 4, dtype=torch.long))


def test_timings_use_the_decoder_and_fall_back_to_transformers(monkeypatch):
    import course_lib.decoder as decoder_module

    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 6))
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(decoder_module, "supports", lambda m: (False, "test"))
        timing = decode_timing(model, ids, steps=3, repeats=2, warmup=0)
        assert isinstance(timing, Timing) and len(timing.times) == 2 and timing.median > 0
        assert prefill_timing(model, ids, repeats=1, warmup=0).median > 0


def test_timing_from_times():
    timing = Timing.from_times([3.0, 1.0, 2.0])
    assert (timing.median, timing.low, timing.high, timing.times) == (2.0, 1.0, 3.0, (3.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="empty"):
        Timing.from_times([])


@pytest.fixture
def compiled_kernels():
    if not kernels.available():  # compiled on first use (once per machine), not when tests are collected
        pytest.skip("the course's CPU kernels could not be compiled here")


@pytest.mark.usefixtures("compiled_kernels")
@pytest.mark.parametrize("mode", [None, "w8a16", "w8a8", "w8a8 per tensor", "w4a16", "w8a8 with its output layer"])
@pytest.mark.parametrize("batch", [3, 5])  # 5: the float layers' few-rows loop (4 to 8 rows), one row past a block
def test_the_fused_step_computes_what_the_op_by_op_step_does(mode, batch):
    """One C++ call per token (fused_decode.cpp) against the Python step it replaces: the same
    logits to float rounding, the same greedy tokens, with left padding and grouped-query attention."""
    model = _tiny_llama()
    if mode:
        quantize_model(model, mode.split()[0], granularity="tensor" if "tensor" in mode else None,
                       include_lm_head="output" in mode)
    ids, mask = _prompts(batch)
    fused, eager = Decoder(model, batch, 20), Decoder(model, batch, 20, speedup="eager")
    assert fused._fused is not None and eager._fused is None
    token = eager.prefill(ids, mask).argmax(-1, keepdim=True)
    fused.prefill(ids, mask)
    for _ in range(6):
        expected = eager.step(token)
        assert torch.allclose(fused.step(token), expected, atol=1e-5, rtol=1e-5)
        token = expected.argmax(-1, keepdim=True)
    assert torch.equal(fused.greedy(ids, 8, mask), eager.greedy(ids, 8, mask))


@pytest.mark.usefixtures("compiled_kernels")
def test_the_fused_step_leaves_what_it_does_not_know_to_the_op_by_op_step():
    from peft import LoraConfig, get_peft_model

    outliers = _tiny_llama()
    quantize_model(outliers, "w8a8", outlier_threshold=6.0)  # LLM.int8(): a host sync per layer, in Python
    lora = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    for model in (outliers, lora, _tiny_llama().to(torch.bfloat16)):
        decoder = Decoder(model, 1, 8)
        assert decoder._fused is None
        decoder.greedy(torch.randint(1, 96, (1, 4)), 3)


@pytest.mark.parametrize("speedup", ["fused", "eager"])
def test_a_step_past_max_length_is_an_error_not_a_write_out_of_bounds(speedup):
    decoder = Decoder(_tiny_llama(), 1, 6, speedup=speedup)
    token = decoder.prefill(torch.randint(1, 96, (1, 5))).argmax(-1, keepdim=True)
    decoder.step(token)  # slot 5, the last
    with pytest.raises((RuntimeError, IndexError)):
        decoder.step(token)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["w8a16", "w8a8", "w4a16"])
def test_teacher_decode_with_the_kernels_matches_the_reference(teacher, mode):
    """The decode path (the fused C++ step and the compiled loops) against the plain torch path op
    by op, on the teacher, fed the same tokens. Weight-only schemes agree to float rounding. W8A8
    does not, and cannot: one activation a rounding apart can land on the next INT8 step, and on
    this model that moves later logits by up to ~2 (nudging the plain path's embeddings by one part
    in 4 million does the same), so there the greedy choices must agree at nearly every position."""
    from course_lib.evaluate import human_corpus, token_batch

    model, tokenizer = teacher
    quantized = copy.deepcopy(model)
    quantize_model(quantized, mode)
    ids = token_batch(tokenizer, human_corpus(), 2, 24)
    fast = Decoder(quantized, 2, 40)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_fast", lambda x: False)
        plain = Decoder(quantized, 2, 40, speedup="eager")
        expected = plain.prefill(ids)
        fast.prefill(ids)
        largest, agree = 0.0, 0
        for _ in range(12):
            token = expected.argmax(-1, keepdim=True)
            expected, got = plain.step(token), fast.step(token)
            largest = max(largest, (got - expected).abs().max().item())
            agree += (got.argmax(-1) == expected.argmax(-1)).sum().item()
    assert fast._fused is not None
    if mode == "w8a8":
        assert agree >= 21  # of 24
    else:
        assert largest < 1e-3 and agree == 24


def test_generate_tokens_is_transformers_greedy_and_falls_back_for_sampling():
    from course_lib.decoder import generate_tokens

    model = _tiny_llama()
    model.generation_config.eos_token_id = 7
    ids, mask = _prompts()
    batch = {"input_ids": ids, "attention_mask": mask}
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=12, min_new_tokens=3, pad_token_id=0, **greedy)[:, 10:]
    ours = generate_tokens(model, batch, 12, 3, 0, greedy)
    assert torch.equal(ours[:, :expected.shape[1]], expected) and (ours[:, expected.shape[1]:] == 0).all()
    torch.manual_seed(0)
    sampled = generate_tokens(model, batch, 4, None, 0, {"do_sample": True, "temperature": 1.0, "top_p": None})
    assert sampled.shape == (3, 4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("speedup", ["graph", "compile"])
@pytest.mark.parametrize("mode", [None, "w8a16", "w8a8"])
def test_decoder_steps_as_cuda_graphs_match_eager(speedup, mode):
    model = _tiny_llama().cuda().to(torch.bfloat16)
    if mode:
        quantize_model(model, mode)
    ids, mask = (t.cuda() for t in _prompts())
    eager = Decoder(model, 3, 24).greedy(ids, 10, mask)
    fast = Decoder(model, 3, 24, speedup=speedup)
    assert torch.equal(fast.greedy(ids, 10, mask), eager)
    assert torch.equal(fast.greedy(ids, 10, mask), eager)  # the recorded graph, replayed for a new prompt
    timing = decode_timing(model, ids, steps=4, repeats=2, warmup=1)
    assert timing.median > 0


@cuda
@pytest.mark.cuda
def test_crossover_runs_on_cuda():
    from course_lib.crossover import int8_crossover

    rows = int8_crossover(widths=(256, 512), steps=4, repeats=1)
    assert rows[0]["baseline"] == "BF16" and all(r["w8a8 tok/s"] > 0 for r in rows)
