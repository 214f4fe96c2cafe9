"""course_lib.pruning: ShortGPT block influence, Minitron MLP width, and what a student keeps, on tiny random Llamas."""
import pytest
import torch

from course_lib import models, pruning
from course_lib.runtime import seeded


def tiny_llama(layers=4, vocab=64):
    """A random Llama-shaped model (made on its own random stream), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with seeded(0):
        return LlamaForCausalLM(config).eval()


def calibration(vocab=64, rows=3, length=12):
    with seeded(1):
        ids = torch.randint(1, vocab, (rows, length))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def silence(model, index):
    """Make layer `index` the identity: both residual branches write zeros, so x_out = x_in."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_block_influence_is_one_value_per_layer_in_range():
    model = tiny_llama(layers=5)
    influence = pruning.block_influence(model, calibration())
    assert influence.shape == (5,) and influence.dtype == torch.float64
    assert bool(((influence >= 0) & (influence <= 2)).all())
    assert not model.training


def test_a_layer_that_does_nothing_has_zero_influence_and_is_dropped_first():
    model = tiny_llama(layers=4)
    silence(model, 1)
    silence(model, 2)
    influence = pruning.block_influence(model, calibration())
    assert influence[1] == pytest.approx(0, abs=1e-6) and influence[2] == pytest.approx(0, abs=1e-6)
    assert influence[0] > 1e-3 and influence[3] > 1e-3
    assert pruning.measured_layers(model, 2, calibration()) == [0, 3]
    student = models.make_student(model, 2, calibration=calibration())
    assert student.config.course_student_layers == [0, 3]


@pytest.mark.parametrize("measure", [pruning.block_influence, pruning.mlp_channel_importance])
def test_padding_does_not_count(measure):
    model = tiny_llama(layers=3)
    row = calibration(rows=1)[0]["input_ids"]
    padded = torch.cat([row, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    both = torch.cat([padded, padded])
    mask = (both != 0).long()
    plain = measure(model, [{"input_ids": row}])
    with_pad = measure(model, [{"input_ids": both, "attention_mask": mask}])
    torch.testing.assert_close(plain, with_pad, rtol=1e-5, atol=1e-6)


def test_most_influential_keeps_n_distinct_sorted_indices():
    assert pruning.most_influential([0.1, 0.5, 0.2, 0.9, 0.3], 3) == [1, 3, 4]
    assert pruning.most_influential([0.2, 0.2, 0.2], 2) == [0, 1]  # ties: the earlier layer
    for n in range(1, 6):
        chosen = pruning.measured_layers(tiny_llama(layers=5), n, calibration())
        assert chosen == sorted(set(chosen)) and len(chosen) == n and all(0 <= i < 5 for i in chosen)


@pytest.mark.parametrize("n", [0, 6, -1, 2.0, True])
def test_bad_sizes_are_refused(n):
    with pytest.raises(ValueError, match="n_layers"):
        pruning.most_influential([0.1] * 5, n)
    with pytest.raises(ValueError, match="n_layers"):
        models.make_student(tiny_llama(layers=5), n, calibration=calibration())


@pytest.mark.parametrize("layers", [[0, 5], [0], [2, 1], [1, 1], [0, 1.0]])
def test_bad_explicit_layers_are_refused(layers):
    with pytest.raises(ValueError, match="distinct increasing indices"):
        models.make_student(tiny_llama(layers=5), 2, layers=layers)


def test_explicit_layers_win_and_block_influence_needs_batches():
    student = models.make_student(tiny_llama(layers=5), 2, layers=[1, 4])
    assert student.config.course_student_layers == [1, 4]
    with pytest.raises(ValueError, match="non-empty"):
        pruning.block_influence(tiny_llama(), [])


def kill_channels(model, dead):
    """Zero up_proj's rows `dead` in every layer: those MLP channels output act(gate·x)·0 = 0."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[dead] = 0


def test_channel_importance_is_mean_abs_activation_and_zero_for_dead_channels():
    model = tiny_llama(layers=2)
    kill_channels(model, [3, 10, 40])
    importance = pruning.mlp_channel_importance(model, calibration())
    assert importance.shape == (2, 64) and importance.dtype == torch.float64 and not model.training
    assert bool((importance[:, [3, 10, 40]] == 0).all()) and bool((importance.sum(1) > 0).all())
    seen = []  # the same mean |act(gate·x)·(up·x)|, read by hand at layer 1's down_proj
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(**calibration()[0])
    handle.remove()
    torch.testing.assert_close(importance[1], seen[0].abs().mean((0, 1)).double(), rtol=1e-5, atol=1e-7)


def test_pruning_only_dead_channels_leaves_the_logits_unchanged_and_reloads(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama(layers=3)
    dead = list(range(0, 64, 4))  # 16 of 64 channels
    kill_channels(model, dead)
    ids = calibration()[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    importance = pruning.mlp_channel_importance(model, calibration())
    assert pruning.prune_mlp_width(model, importance, 48) is model
    assert model.config.intermediate_size == 48
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (48, 32) and layer.mlp.down_proj.weight.shape == (32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=1e-5, atol=1e-6)


def test_pruning_more_changes_the_output_and_bad_widths_are_refused():
    model = tiny_llama(layers=2)
    ids = calibration()[0]["input_ids"]
    importance = pruning.mlp_channel_importance(model, calibration())
    with torch.no_grad():
        before = model(ids).logits
        assert not torch.allclose(pruning.prune_mlp_width(model, importance, 16)(ids).logits, before)
    for width in (0, 65, -1, 8.0, True):
        with pytest.raises(ValueError, match="intermediate_size must be an int between 1 and the model's 64"):
            pruning.prune_mlp_width(tiny_llama(layers=2), importance, width)
    with pytest.raises(ValueError, match=r"importance must have shape \(2, 64\)"):
        pruning.prune_mlp_width(tiny_llama(layers=2), importance[:1], 16)


def test_make_student_refuses_a_bad_width_before_any_work(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a calibration pass ran before the width was checked")

    monkeypatch.setattr(pruning, "calibration_batches", never)
    monkeypatch.setattr(pruning, "mlp_channel_importance", never)
    for width in (0, 65, 8.0):
        with pytest.raises(ValueError, match="intermediate_size must be an int between 1 and the model's 64"):
            models.make_student(tiny_llama(layers=2), 1, intermediate_size=width)
