"""course_lib.gguf_blocks: bit-exact against the gguf package, and the real blocks of the teacher."""
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from course_lib.gguf_blocks import (GGUF_BLOCKS, decode_gguf_blocks, decode_tensor, encode_gguf_blocks,  # noqa: E402
                                    gguf_weight_as_loaded, hf_name, read_gguf_tensors, unpermute_rope_rows)

QTYPES = ["Q8_0", "Q4_0", "Q4_1"]


def _values(seed, n_blocks=300):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(32 * n_blocks).astype(np.float32)
    values *= rng.uniform(1e-3, 30, size=values.size).astype(np.float32)  # scales across blocks
    values[:32] = 0.0                      # an all-zero block (d = 0)
    values[32:64] = 1.5                    # a constant block
    values[64:96] = np.float32(0.5) * np.arange(32, dtype=np.float32)  # exact halves: rounding ties
    return values


def _bits(array):
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", QTYPES)
def test_encode_is_bit_exact_against_gguf(qtype):
    values = _values(1)
    theirs = gguf.quants.quantize(values.reshape(10, -1), gguf.GGMLQuantizationType[qtype]).reshape(-1)
    ours = encode_gguf_blocks(torch.from_numpy(values), qtype)
    assert ours.dtype == torch.uint8 and ours.numel() == 300 * GGUF_BLOCKS[qtype].block_bytes
    assert np.array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_is_bit_exact_against_gguf(qtype):
    raw = gguf.quants.quantize(_values(2).reshape(1, -1), gguf.GGMLQuantizationType[qtype]).reshape(-1)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    ours = decode_gguf_blocks(raw, qtype)
    assert ours.dtype == torch.float32
    assert np.array_equal(_bits(ours.numpy()), _bits(theirs))
    assert torch.equal(decode_gguf_blocks(torch.from_numpy(raw), qtype), ours)  # numpy or torch bytes


def test_block_layout_by_hand():
    # one Q4_1 block: d = 0.5, m = -1, values q = 0..15 then 15..0
    q = np.array(list(range(16)) + list(range(15, -1, -1)), dtype=np.uint8)
    block = np.concatenate([np.array([0.5, -1.0], dtype=np.float16).view(np.uint8), q[:16] | (q[16:] << 4)])
    assert np.array_equal(decode_gguf_blocks(block, "Q4_1").numpy(), 0.5 * q.astype(np.float32) - 1)
    assert GGUF_BLOCKS["Q4_1"].bits_per_weight == 5.0 and GGUF_BLOCKS["Q4_0"].bits_per_weight == 4.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="qtype"):
        decode_gguf_blocks(np.zeros(34, dtype=np.uint8), "Q5_K")
    with pytest.raises(ValueError, match="whole Q8_0 blocks"):
        decode_gguf_blocks(np.zeros(33, dtype=np.uint8), "Q8_0")
    with pytest.raises(TypeError, match="uint8"):
        decode_gguf_blocks(np.zeros(34, dtype=np.float32), "Q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_gguf_blocks(torch.zeros(40), "Q4_0")
    with pytest.raises(ValueError, match="finite"):
        encode_gguf_blocks(torch.full((32,), float("nan")), "Q4_1")


def test_names_and_rope_row_order():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError):
        hf_name("rope_freqs")
    # llama.cpp's converter: rows (i, i + d/2) of each head become neighbours (2i, 2i + 1)
    hf = torch.arange(2 * 8, dtype=torch.float32).view(16, 1)
    llama_cpp = hf.view(2, 2, 4, 1).transpose(1, 2).reshape(16, 1)
    assert llama_cpp[:4, 0].tolist() == [0, 4, 1, 5]
    assert torch.equal(unpermute_rope_rows(llama_cpp, n_heads=2), hf)


@pytest.fixture(scope="module")
def shipped():
    from course_lib.models import teacher_gguf_path

    return read_gguf_tensors(teacher_gguf_path())


@pytest.mark.slow
def test_real_blocks_decode_to_exactly_the_teachers_weights(shipped, teacher):
    model, _ = teacher
    state = model.state_dict()
    config = model.config
    kinds = {t.qtype for t in shipped.values()}
    assert kinds == {"Q4_1", "Q8_0", "F32"}
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                 "blk.7.ffn_down.weight", "blk.29.ffn_gate.weight", "blk.29.attn_output.weight",
                 "blk.5.attn_norm.weight", "output_norm.weight"]:
        tensor = shipped[name]
        ours = gguf_weight_as_loaded(tensor, config.num_attention_heads, config.num_key_value_heads)
        loaded = state[hf_name(name)]
        assert torch.equal(ours.view(torch.int32), loaded.view(torch.int32)), name  # every bit
    # q and k differ only by the row order: the same rows, reordered
    q_file = decode_tensor(shipped["blk.0.attn_q.weight"])
    q_loaded = state["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q_file, q_loaded)
    assert torch.equal(q_file.sort(dim=0).values, q_loaded.sort(dim=0).values)


@pytest.mark.slow
def test_reencoding_the_teachers_weights_gives_back_the_files_blocks(shipped):
    for name in ["blk.0.ffn_up.weight", "blk.13.attn_q.weight"]:
        tensor = shipped[name]
        again = encode_gguf_blocks(decode_tensor(tensor), tensor.qtype)
        assert np.array_equal(again.numpy(), tensor.raw)


def _maps(path) -> int:
    """How many memory maps of the file this process holds (Linux: /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return sum(str(path) in line for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_reading_one_tensor_parses_once_and_leaves_no_map_open(shipped):
    from course_lib.gguf_blocks import GGUFFile, read_gguf_tensor
    from course_lib.models import teacher_gguf_path

    path = teacher_gguf_path()
    before = _maps(path)  # other tests may hold maps of their own (read_gguf_tensors' views)
    one = read_gguf_tensor(path, "output_norm.weight")
    assert type(one.raw) is np.ndarray and one.raw.flags.owndata  # a copy ...
    assert _maps(path) == before  # ... and the file's map is gone
    with GGUFFile(path) as gguf_file:
        assert _maps(path) > before and len(gguf_file.names) == 272
        tensors = [gguf_file.tensor(name) for name in gguf_file.names[:3]]
    assert _maps(path) == before
    assert np.array_equal(tensors[0].raw, shipped[tensors[0].name].raw)
    assert np.array_equal(one.raw, shipped["output_norm.weight"].raw)


def test_the_files_bytes_split_into_metadata_and_tensors_by_format():
    from course_lib.gguf_blocks import gguf_size_parts
    from course_lib.models import teacher_gguf_path

    path = teacher_gguf_path()
    before = _maps(path)
    parts = {row["part"]: row for row in gguf_size_parts(path)}
    assert _maps(path) == before, "the reader's map must close"
    assert sum(row["bytes"] for row in parts.values()) == path.stat().st_size
    embedding = parts["Q8_0: token_embd.weight"]
    assert embedding["weights"] == 49152 * 576 and embedding["bits/weight"] == 8.5  # 34 bytes a block of 32
    assert parts["Q4_1: 210 tensors"]["bits/weight"] == 5.0
    assert 0 < parts["metadata: the rest"]["bytes"] < parts["metadata: tokenizer"]["bytes"]
