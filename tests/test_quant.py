"""course_lib.quant: the formulas of chapters 01-02, their granularities, bad inputs, LLM.int8()."""
import pytest
import torch

from course_lib.quant import (absmax_quantize, clipping_error_split, dequantize, fake_quantize,
                              float32_fields, int8_matmul, int8_vectorwise_quant, llm_int8_matmul,
                              relative_error, zeropoint_quantize)

SLIDE = torch.tensor([[0.34, 3.75, 5.64], [1.12, 2.7, -0.9], [-4.7, 0.68, 1.43]])


pytestmark = pytest.mark.usefixtures("one_thread")


def test_absmax_on_the_slides_matrix():
    q, scale = absmax_quantize(SLIDE)
    # the slide prints 126 for 5.64; its own formula gives 127: the largest |x| always maps to ±127
    assert q.tolist() == [[8, 84, 127], [25, 61, -20], [-106, 15, 32]]
    assert q.dtype == torch.int8
    assert scale.item() == pytest.approx(5.64 / 127)
    assert torch.allclose(dequantize(q, scale), SLIDE, atol=scale.item() / 2 + 1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_absmax_range_and_error_bound(bits):
    torch.manual_seed(bits)
    x = torch.randn(16, 32) * 3
    q, scale = absmax_quantize(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max().item() == qmax  # the extreme maps onto the last level
    assert (x - dequantize(q, scale)).abs().max() <= scale / 2 + 1e-6  # rounding error <= half a step


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zeropoint_uses_every_level_and_inverts(bits):
    torch.manual_seed(0)
    x = torch.rand(8, 64) * 5 + 1  # all positive: absmax would waste the negative half
    q, scale, zero_point = zeropoint_quantize(x, bits)
    half = 2 ** (bits - 1)
    assert q.min().item() == -half and q.max().item() == half - 1
    assert zero_point.dtype == torch.int32
    assert (x - dequantize(q, scale, zero_point)).abs().max() <= scale / 2 + 1e-5
    assert relative_error(x, fake_quantize(x, bits, zero_point=True)) < relative_error(x, fake_quantize(x, bits))


def test_zeropoint_formula_on_the_slide():
    q, scale, zero_point = zeropoint_quantize(SLIDE)
    assert scale.item() == pytest.approx((5.64 + 4.7) / 255)
    assert zero_point.item() == round(4.7 / scale.item()) - 128
    assert q[0, 2].item() == 127 and q[2, 0].item() == -128


def test_granularity_shapes_and_errors():
    torch.manual_seed(0)
    w = torch.randn(12, 64)
    w[:, 5] *= 30  # an outlier input column hurts whoever shares its scale
    _, per_tensor = absmax_quantize(w)
    _, per_channel = absmax_quantize(w, dim=-1)
    _, per_column = absmax_quantize(w, dim=0)
    _, per_group = absmax_quantize(w, group_size=16)
    assert per_tensor.shape == () and per_channel.shape == (12, 1) and per_column.shape == (1, 64)
    assert per_group.shape == (12, 4)
    errors = {name: relative_error(w, fake_quantize(w, 4, **kw)) for name, kw in
              [("tensor", {}), ("channel", {"dim": -1}), ("group", {"group_size": 16})]}
    assert errors["group"] < errors["channel"] <= errors["tensor"]


def test_per_group_equals_quantizing_each_group_alone():
    torch.manual_seed(1)
    x = torch.randn(3, 24)
    q, scale = absmax_quantize(x, 4, group_size=8)
    for g in range(3):
        q_alone, s_alone = absmax_quantize(x[:, 8 * g:8 * g + 8], 4, dim=-1)
        assert torch.equal(q[:, 8 * g:8 * g + 8], q_alone)
        assert torch.equal(scale[:, g:g + 1], s_alone)
    qz, sz, zz = zeropoint_quantize(x, 4, group_size=8)
    assert sz.shape == zz.shape == (3, 3)
    assert (x - dequantize(qz, sz, zz)).abs().max() <= sz.max() / 2 + 1e-6


def test_all_zero_and_constant_inputs():
    q, scale = absmax_quantize(torch.zeros(2, 4), dim=-1)
    assert q.abs().sum() == 0 and torch.equal(dequantize(q, scale), torch.zeros(2, 4))
    x = torch.full((3,), 1000.0)
    assert torch.equal(dequantize(*zeropoint_quantize(x)), x)


@pytest.mark.parametrize("call, word", [
    (lambda: absmax_quantize(torch.tensor([1.0, float("nan")])), "finite"),
    (lambda: absmax_quantize(torch.tensor([1.0, float("inf")]), dim=0), "finite"),
    (lambda: zeropoint_quantize(torch.tensor([float("-inf"), 1.0])), "finite"),
    (lambda: absmax_quantize(torch.ones(4), bits=1), "bits"),
    (lambda: absmax_quantize(torch.ones(4), bits=9), "bits"),
    (lambda: zeropoint_quantize(torch.ones(4), bits=4.0), "bits"),
    (lambda: absmax_quantize(torch.ones(2, 10), group_size=3), "group_size"),
    (lambda: zeropoint_quantize(torch.ones(2, 10), group_size=0), "group_size"),
    (lambda: absmax_quantize(torch.ones(2, 8), dim=0, group_size=4), "not both"),
    (lambda: absmax_quantize(torch.ones(2, 8), dim=2), "dim"),
    (lambda: clipping_error_split(torch.ones(4), clip=0.0), "clip"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_non_tensors_and_integer_tensors_are_type_errors():
    with pytest.raises(TypeError, match="floating-point"):
        absmax_quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        zeropoint_quantize(torch.arange(4))


def test_clipping_trades_rounding_error_for_clipping_error():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((20_000,))  # heavy tails, like real weights
    full = clipping_error_split(x, x.abs().max().item(), 4)
    tight = clipping_error_split(x, 3 * x.std().item(), 4)
    assert full[1] == 0  # nothing is clipped at the max
    assert tight[0] < full[0] and tight[1] > 0
    assert sum(tight) < sum(full)  # with 4 bits, clipping the tails pays off


def test_float32_fields():
    assert float32_fields(1.0) == ("0", "01111111", "0" * 23)
    assert float32_fields(-2.5) == ("1", "10000000", "01" + "0" * 21)


def test_int8_matmul_is_exact():
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    w = torch.randint(-128, 128, (24, 40), dtype=torch.int8)
    c = int8_matmul(a, w.t())
    assert c.dtype == torch.int32
    assert torch.equal(c, (a.long() @ w.long().t()).int())
    with pytest.raises(TypeError, match="int8"):
        int8_matmul(a.float(), w.t())


def test_int8_vectorwise_quant_agrees_with_bitsandbytes():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    x = torch.randn(32, 96).clamp(-4, 4)
    x[:, [7, 50]] *= 8  # two outlier features, as LLM.int8() finds in real models
    for threshold in (0.0, 6.0):
        ours = int8_vectorwise_quant(x, threshold)
        theirs = bnb_functional.int8_vectorwise_quant(x.clone(), threshold)
        assert torch.equal(ours[0], theirs[0])
        assert torch.allclose(ours[1], theirs[1])
        if threshold:
            assert torch.equal(ours[2], theirs[2].long()) and ours[2].tolist() == [7, 50]
        else:
            assert ours[2].numel() == 0 and theirs[2] is None


def test_llm_int8_matmul_keeps_outliers_in_float():
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    x[:, 3] *= 60  # a huge feature ruins every row's scale
    w = torch.randn(32, 64) / 8
    exact = x @ w.t()
    plain = llm_int8_matmul(x, w, threshold=0.0)
    decomposed = llm_int8_matmul(x, w, threshold=6.0)
    assert relative_error(exact, decomposed) < 0.01 < relative_error(exact, plain)
    assert decomposed.shape == (16, 32)
    assert llm_int8_matmul(x.view(2, 8, 64), w).shape == (2, 8, 32)
    with pytest.raises(ValueError, match="share K"):
        llm_int8_matmul(x, w.t())


def test_contract_names_reach_the_other_modules():
    import course_lib.quant as quant
    from course_lib.gguf_blocks import decode_gguf_blocks
    from course_lib.int8_inference import Int8Linear, quantize_model

    assert quant.Int8Linear is Int8Linear and quant.quantize_model is quantize_model
    assert quant.decode_gguf_blocks is decode_gguf_blocks
    with pytest.raises(AttributeError):
        quant.no_such_name


def test_tiny_absmax_gets_a_floor_not_an_infinite_scale():
    from course_lib.quant import absmax_quantize_rows

    x = torch.tensor([[1e-40, -5e-41, 0.0], [0.0, 0.0, 0.0], [3.0, -1.5, 0.5]])
    q, scale = absmax_quantize(x, 8, dim=-1)
    assert torch.isfinite(scale).all() and scale.min() >= torch.finfo(torch.float32).eps
    assert q[0].abs().max() <= 1 and (q[1] == 0).all() and q[2, 0] == 127
    q_rows, scale_rows = absmax_quantize_rows(x)  # the layers' version: the same numbers
    assert torch.equal(q_rows, q) and torch.equal(scale_rows, scale)
