"""GGUF quantization blocks by hand: the formats the teacher was shipped in (chapter 02).

llama.cpp stores weights in blocks of 32 values, each block with its own scale (ggml-quants.c,
gguf-py's quants.py):

    Q8_0  [d: fp16][32 × int8]              x = d·q                d = max|x|/127      8.5 bits/weight
    Q4_0  [d: fp16][16 bytes of nibbles]    x = d·(q − 8)          d = max/−8          4.5 bits/weight
    Q4_1  [d: fp16][m: fp16][16 bytes]      x = d·q + m            d = (max−min)/15    5.0 bits/weight

In a 4-bit block the low nibble of byte j is value j and the high nibble value j + 16. Decoding and
encoding here are bit-exact against the `gguf` package (float32 arithmetic in the same order).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK = 32


@dataclass(frozen=True)
class BlockFormat:
    """Bytes per block and the fp16 fields at its start."""
    name: str
    block_bytes: int
    header: tuple[str, ...]  # the fp16 fields, in order
    bits: int                # bits of each quantized value

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / BLOCK


GGUF_BLOCKS = {
    "Q8_0": BlockFormat("Q8_0", 34, ("d",), 8),
    "Q4_0": BlockFormat("Q4_0", 18, ("d",), 4),
    "Q4_1": BlockFormat("Q4_1", 20, ("d", "m"), 4),
}


def _format(qtype: str) -> BlockFormat:
    if qtype not in GGUF_BLOCKS:
        raise ValueError(f"qtype must be one of {', '.join(GGUF_BLOCKS)}, got {qtype!r}")
    return GGUF_BLOCKS[qtype]


def _as_bytes(raw) -> torch.Tensor:
    if isinstance(raw, np.ndarray) and raw.dtype == np.uint8:
        raw = np.ascontiguousarray(raw)
        raw = torch.from_numpy(raw if raw.flags.writeable else raw.copy())  # file maps are read-only
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"raw must be uint8 bytes (a numpy array or torch tensor), got "
                        f"{getattr(raw, 'dtype', type(raw).__name__)}")
    return raw.reshape(-1)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """roundf() as ggml and gguf-py compute it: halves away from zero (torch.round goes to even)."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def decode_gguf_blocks(raw, qtype: str) -> torch.Tensor:
    """The float32 values stored in `raw`, the flat uint8 bytes of whole GGUF blocks of `qtype`."""
    fmt = _format(qtype)
    raw = _as_bytes(raw)
    if raw.numel() % fmt.block_bytes:
        raise ValueError(f"{raw.numel()} bytes are not whole {qtype} blocks of {fmt.block_bytes} bytes")
    blocks = raw.view(-1, fmt.block_bytes)
    n_header = 2 * len(fmt.header)
    header = blocks[:, :n_header].contiguous().view(torch.float16).float()  # [blocks, 1 or 2]
    d = header[:, :1]
    payload = blocks[:, n_header:]
    if qtype == "Q8_0":
        return (payload.contiguous().view(torch.int8).float() * d).reshape(-1)
    q = torch.cat([payload & 0x0F, payload >> 4], dim=1).float()  # values j, then j + 16
    if qtype == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    return (d * q + header[:, 1:2]).reshape(-1)  # Q4_1: two steps (no fused multiply-add), as gguf


def encode_gguf_blocks(values: torch.Tensor, qtype: str) -> torch.Tensor:
    """The GGUF blocks (flat uint8) that store `values` (a multiple of 32 of them) as `qtype`."""
    fmt = _format(qtype)
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError("values must be a floating-point torch.Tensor")
    if values.numel() == 0 or values.numel() % BLOCK:
        raise ValueError(f"values must be a non-empty multiple of {BLOCK}, got {values.numel()}")
    x = values.detach().float().reshape(-1, BLOCK).cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("values must be finite")
    if qtype == "Q8_0":
        d = x.abs().amax(dim=1, keepdim=True) / 127
        q = _round_half_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=1).reshape(-1)
    if qtype == "Q4_0":
        extreme = x.gather(1, x.abs().argmax(dim=1, keepdim=True))  # the signed value of largest |x|
        d = extreme / -8
        q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        fields = [d]
    else:  # Q4_1
        low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        d = (high - low) / 15
        q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
        fields = [d, low]
    nibbles = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << 4)
    return torch.cat([_fp16_bytes(f) for f in fields] + [nibbles], dim=1).reshape(-1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _fp16_bytes(column: torch.Tensor) -> torch.Tensor:
    return column.to(torch.float16).view(torch.uint8)


# ----------------------------------------------------------------------------- the shipped file

# GGUF tensor names of a llama model -> transformers' names
_GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TO_HF:
        return f"{_GGUF_TO_HF[parts[0]]}.{parts[1]}"
    raise ValueError(f"not a llama GGUF tensor name: {gguf_name!r}")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, still encoded: its raw block bytes and what they hold."""
    name: str
    qtype: str
    shape: tuple[int, ...]  # torch order: [rows, columns]
    raw: np.ndarray         # flat uint8 view into the file


def _as_gguf_tensor(t, copy: bool) -> GGUFTensor:
    raw = t.data.reshape(-1).view(np.uint8)
    return GGUFTensor(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)),
                      np.array(raw) if copy else raw)  # np.array: a plain array owning its bytes


class GGUFFile:
    """A GGUF file parsed once (gguf.GGUFReader reads the container, not the weights), for reading
    several tensors: `with GGUFFile(path) as f: f.tensor("blk.0.attn_q.weight")`. Each tensor comes
    back as a copy of its raw bytes, so leaving the block drops the file's memory map."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        self._tensors = {t.name: t for t in GGUFReader(str(path)).tensors}

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Forget the parsed file: with no tensor view left, its memory map closes."""
        self._tensors = {}

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> GGUFTensor:
        """One tensor's raw blocks (a copy: it outlives the file's map)."""
        if name not in self._tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}; it has e.g. {', '.join(self.names[:4])}")
        return _as_gguf_tensor(self._tensors[name], copy=True)


def read_gguf_tensors(path: str | Path) -> dict[str, GGUFTensor]:
    """Every tensor of a GGUF file by name, as raw bytes: one parse, the arrays views into one memory
    map of the file, which stays open while they are alive (chapter 02 reads them all)."""
    from gguf import GGUFReader

    return {t.name: _as_gguf_tensor(t, copy=False) for t in GGUFReader(str(path)).tensors}


def read_gguf_tensor(path: str | Path, name: str) -> GGUFTensor:
    """One tensor of a GGUF file, its raw bytes copied out: nothing of the file stays mapped. To read
    several, open the file once with `GGUFFile`."""
    with GGUFFile(path) as gguf:
        return gguf.tensor(name)


def gguf_size_parts(path: str | Path) -> list[dict]:
    """Where a GGUF file's bytes go (chapter 00): the metadata before the tensor data (header,
    key–values, tensor index), its tokenizer entries (vocabulary, merges, chat template) counted
    apart, then the tensors grouped by block format, each row with its weights and bits per weight.
    The rows' bytes add up to the file's size (any alignment padding has a row of its own)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tokenizer = sum(sum(part.nbytes for part in field.parts)
                    for name, field in reader.fields.items() if name.startswith("tokenizer."))
    rows = [{"part": "metadata: tokenizer", "tensors": 0, "weights": 0, "bytes": tokenizer},
            {"part": "metadata: the rest", "tensors": 0, "weights": 0, "bytes": reader.data_offset - tokenizer}]
    formats: dict[str, dict] = {}
    for t in reader.tensors:
        row = formats.setdefault(t.tensor_type.name, {"part": t.tensor_type.name, "tensors": 0, "weights": 0,
                                                      "bytes": 0, "names": []})
        row["tensors"] += 1
        row["weights"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
        row["names"].append(t.name)
    padding = Path(path).stat().st_size - reader.data_offset - sum(r["bytes"] for r in formats.values())
    del reader  # its memory map closes with it
    for row in formats.values():
        names = row.pop("names")
        row["part"] = f"{row['part']}: " + (names[0] if len(names) == 1 else f"{len(names)} tensors")
        rows.append(row)
    if padding:
        rows.append({"part": "alignment padding", "tensors": 0, "weights": 0, "bytes": padding})
    for row in rows:
        row["bits/weight"] = 8 * row["bytes"] / row["weights"] if row["weights"] else None
    return rows


def decode_tensor(tensor: GGUFTensor) -> torch.Tensor:
    """A GGUF tensor decoded to float32 in torch's [rows, columns] order (F32 tensors are copied)."""
    if tensor.qtype == "F32":
        return torch.from_numpy(tensor.raw.copy().view(np.float32)).reshape(tensor.shape)
    return decode_gguf_blocks(tensor.raw, tensor.qtype).reshape(tensor.shape)


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for q/k projections. Its converter interleaves each head's rows
    (rotary pairs (i, i + d/2) become neighbours (2i, 2i+1), GGML's RoPE layout); transformers puts
    them back when it loads a GGUF, and so does this, as a pure reordering of rows."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of rotary pairs")
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_weight_as_loaded(tensor: GGUFTensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """A llama GGUF tensor decoded and reordered as transformers' model holds it (name: `hf_name`)."""
    weight = decode_tensor(tensor)
    if ".attn_q." in tensor.name:
        return unpermute_rope_rows(weight, n_heads)
    if ".attn_k." in tensor.name:
        return unpermute_rope_rows(weight, n_kv_heads)
    return weight
