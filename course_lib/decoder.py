"""A lean decode loop over a Hugging Face Llama-family model's own modules, gpt-fast style (chapter 02).

Decoding one token reads every weight once and does little arithmetic: on a CPU its time is memory
traffic plus per-token Python. This loop keeps the second small:

- q/k/v and gate/up run as ONE fused layer each (their weights stacked once per model and kept on
  it, `decoder_layers`), so the activation is read — and for W8A8 quantized — once;
- a static KV cache: every position has its slot from the start, nothing grows or is copied;
- one function per step, no checks and no host synchronization in it (a GPU can run it as a graph);
  at one token, attention is five small tensor operations rather than the general attention kernel;
- on a CPU, that step runs in ONE call to the course's C++ loop over the layers
  (`course_lib/kernels/fused_decode.cpp`, speedup="fused"): ~1,000 torch operations a token from
  Python cost as much time as reading the weights.

It runs the model's own layers (float nn.Linear, the course's Int8Linear / Int4Linear, LoRA-wrapped
ones unfused), its embedding, norms' weights, rotary embedding and output layer. What it does not
cover — another architecture, q/k norms, sliding windows, sampling — `supports` names, and
`course_lib.evaluate`'s timings and `models.generate` then use transformers' own loop.

    decoder = Decoder(model, batch_size=8, max_length=160)
    logits = decoder.prefill(prompt_ids)              # [B, vocab] for the last position
    token = logits.argmax(-1, keepdim=True)
    logits = decoder.step(token)                      # one token per sequence, then again ...

A decoder built from a model notices when that model's weights or layers change afterwards
(fine-tuning, quantize_model) and rebuilds its fused layers before the next prefill; decoders of
the same unchanged model share them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _inner_model(model: nn.Module) -> nn.Module:
    """The *ForCausalLM under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model: nn.Module) -> tuple[bool, str]:
    """(True, "") when `Decoder` can run `model`, else (False, why not)."""
    inner = _inner_model(model)
    body = getattr(inner, "model", None)
    config = getattr(inner, "config", None)
    layers = getattr(body, "layers", None)
    if config is None or layers is None or not hasattr(inner, "lm_head") or not hasattr(body, "rotary_emb"):
        return False, "not a Llama-family causal LM (model.model.layers, rotary_emb, lm_head)"
    if getattr(config, "sliding_window", None) or getattr(config, "pretraining_tp", 1) != 1:
        return False, "sliding-window attention or tensor-parallel weights"
    if inner.training:
        return False, "the model is in training mode (dropout): call model.eval()"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or hasattr(attn, "q_norm") or \
                not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return False, "a decoder layer without Llama's q/k/v/o and gate/up/down projections (or with q/k norms)"
    return True, ""


def fuse(layers) -> nn.Module | None:
    """One module computing `layers` side by side (outputs concatenated), or None if they cannot
    be fused (different kinds, LoRA wrappers, ...). nn.Linear weights are stacked; quantized
    layers fuse themselves (`Int8Linear.concat`, `Int4Linear.concat`)."""
    kind = type(layers[0])
    if any(type(layer) is not kind for layer in layers):
        return None
    if kind is nn.Linear:
        if any(type(lin.weight.data) is not torch.Tensor for lin in layers):  # torchao's quantized tensors
            return None
        fused = nn.Linear(layers[0].in_features, sum(lin.out_features for lin in layers),
                          bias=layers[0].bias is not None, device=layers[0].weight.device,
                          dtype=layers[0].weight.dtype)
        if any((lin.bias is None) != (layers[0].bias is None) for lin in layers):
            return None
        with torch.no_grad():
            fused.weight.copy_(torch.cat([lin.weight for lin in layers]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([lin.bias for lin in layers]))
        return fused.requires_grad_(False)
    return kind.concat(layers) if hasattr(kind, "concat") else None


class _Split(nn.Module):
    """Layers that share an input but cannot be fused: called one after the other, outputs concatenated."""

    def __init__(self, layers):
        super().__init__()
        self.parts = nn.ModuleList(layers)

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.parts], dim=-1)


def _fingerprint(model: nn.Module) -> tuple:
    """Which modules and tensors the model holds, where their data lives and how often each tensor
    was changed in place: a training step, load_state_dict, `.to()` or a layer swap changes it."""
    tensors = [*model.parameters(), *model.buffers()]
    return (tuple(map(id, model.modules())), tuple(map(id, tensors)), tuple(map(_address, tensors)),
            tuple(0 if t.is_inference() else t._version for t in tensors))


def _address(tensor: torch.Tensor) -> int:
    try:
        return tensor.data_ptr()
    except RuntimeError:  # a tensor subclass without storage of its own (torchao's quantized weights)
        return 0


class _KeptLayers:
    """A model's decoder layers (q/k/v and gate/up fused), kept on the model itself so that they
    are built once, not at every `generate` call (fusing copies the weights: 280 MB for the FP32
    teacher), with the fingerprint they were built for. A copy of the model (deepcopy, pickle)
    starts without them: its fused layers would be the original's."""

    def __init__(self, fingerprint: tuple = (), layers: list | None = None):
        self.fingerprint, self.layers = fingerprint, layers or []

    def __deepcopy__(self, memo):
        return _KeptLayers()

    def __reduce__(self):
        return _KeptLayers, ()


KEPT = "_course_decoder_layers"  # the attribute of the model that holds them


def decoder_layers(model: nn.Module) -> tuple[list[dict], tuple]:
    """(layers, fingerprint): the per-layer modules `Decoder` runs, fused q/k/v and gate/up
    included, built on first use and kept on `model` until it changes (`_fingerprint`)."""
    fingerprint = _fingerprint(model)
    kept = model.__dict__.get(KEPT)
    if kept is None or kept.fingerprint != fingerprint:
        kept = _KeptLayers(fingerprint, _layers(_inner_model(model)))
        model.__dict__[KEPT] = kept  # a plain attribute: not a submodule, not in the state dict
    return kept.layers, kept.fingerprint


def _layers(inner: nn.Module) -> list[dict]:
    layers = []
    for layer in inner.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        layers.append({
            "norm1": layer.input_layernorm, "norm2": layer.post_attention_layernorm,
            "qkv": fuse(qkv) or _Split(qkv), "o": attn.o_proj, "scaling": attn.scaling,
            "gate_up": fuse(gate_up) or _Split(gate_up), "down": mlp.down_proj, "act": mlp.act_fn,
        })
    return layers


SPEEDUPS = ("fused", "eager", "graph", "compile")


def _kernel_linear(module: nn.Module):
    """`module` as the fused step's `course_kernels.Linear` (its own tensors, no copy), or None
    when it is not a form the C++ loop knows (LoRA wrappers, LLM.int8(), torchao's tensors, ...)."""
    from .int8_inference import Int4Linear, Int8Linear

    Linear = torch.classes.course_kernels.Linear
    if type(module) is nn.Linear and type(module.weight.data) is torch.Tensor and module.weight.dtype == torch.float32:
        return Linear("float", module.weight.detach(), None, None if module.bias is None else module.bias.detach(), 0)
    if isinstance(module, Int8Linear) and module.outlier_threshold is None:
        return Linear(module.mode, module.weight, module.weight_scale, module.bias, 0)
    if isinstance(module, Int4Linear):
        return Linear("w4a16", module.packed, module.weight_scale, module.bias, module.group_size)
    return None


def _fused_step(decoder: "Decoder"):
    """The C++ step over `decoder`'s layers and caches (`course_kernels.DecodeStep`), or None where
    it does not apply: not a float32 model on a CPU, no compiled kernels, an activation other than
    SiLU, or a layer the C++ loop does not know."""
    from . import kernels

    if decoder.device.type != "cpu" or decoder.dtype != torch.float32 or not kernels.available():
        return None
    head = _kernel_linear(decoder.lm_head)
    linears = [[_kernel_linear(layer[name]) for name in ("qkv", "o", "gate_up", "down")] for layer in decoder.layers]
    silu = getattr(_inner_model(decoder.model).config, "hidden_act", None) in ("silu", "swish")
    if head is None or not silu or any(linear is None for row in linears for linear in row):
        return None
    step = torch.classes.course_kernels.DecodeStep(decoder.n_heads, decoder.n_kv, decoder.head_dim,
                                                   decoder.norm.weight.detach(), decoder.norm.variance_epsilon, head)
    for layer, (qkv, o, gate_up, down), k_cache, v_cache in zip(decoder.layers, linears, decoder.k_cache, decoder.v_cache):
        step.add_layer(layer["norm1"].weight.detach(), layer["norm1"].variance_epsilon, qkv, o, layer["scaling"],
                       k_cache, v_cache, layer["norm2"].weight.detach(), layer["norm2"].variance_epsilon, gate_up, down)
    return step


class Decoder:
    """Greedy-decoding engine for `batch_size` sequences of up to `max_length` tokens (prompt
    included) over `model`'s own modules. Prompts may be left-padded (pass their attention mask).

    `speedup` for the step: "fused" (the default) runs it as one call of the course's C++ loop on a
    CPU (float32 models whose layers are nn.Linear, Int8Linear or Int4Linear; otherwise, and on a
    GPU, op by op); "eager" runs it op by op; "graph" (CUDA) records it once as a CUDA graph
    and replays it, so the CPU launches one graph per token instead of hundreds of kernels;
    "compile" first compiles it with torch.compile (fusing, e.g., INT8 -> bfloat16 conversion into
    the matrix-vector product), then records that as a graph on CUDA. Everything a step reads or
    writes lives in tensors allocated once, so a recorded graph stays valid."""

    def __init__(self, model: nn.Module, batch_size: int, max_length: int, speedup: str = "fused"):
        ok, why = supports(model)
        if not ok:
            raise ValueError(f"Decoder cannot run this model: {why}")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        if speedup not in SPEEDUPS:
            raise ValueError(f"speedup must be one of {SPEEDUPS}, got {speedup!r}")
        self.model, self.batch_size, self.max_length, self.speedup = model, batch_size, max_length, speedup
        self._build()

    def _build(self) -> None:
        inner = _inner_model(self.model)
        config, body = inner.config, inner.model
        self.embed, self.norm, self.lm_head, self.rotary = body.embed_tokens, body.norm, inner.lm_head, body.rotary_emb
        param = self.embed.weight
        self.dtype, self.device = param.dtype, param.device
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.layers, self.fingerprint = decoder_layers(self.model)
        shape = (self.batch_size, self.n_kv, self.max_length, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.slots = torch.arange(self.max_length, device=self.device)
        self.valid = torch.zeros(self.batch_size, self.max_length, dtype=torch.bool, device=self.device)
        self.pad = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self._fused = _fused_step(self) if self.speedup == "fused" else None
        self._step = torch.compile(self._step_eager, dynamic=False) if self.speedup == "compile" else \
            self._step_fused if self._fused is not None else self._step_eager
        self._graph = None

    # ------------------------------------------------------------------ the public door: checks here

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Read the prompts [batch_size, T] (left padding marked by `attention_mask`) into a fresh
        cache; return the logits of their last position [batch_size, vocab] (float32)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size or not 1 <= input_ids.shape[1] < self.max_length:
            raise ValueError(f"input_ids must be [batch_size={self.batch_size}, T] with T < max_length="
                             f"{self.max_length}, got {tuple(input_ids.shape)}")
        if _fingerprint(self.model) != self.fingerprint:  # the model changed since: never decode stale weights
            self._build()
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        length = input_ids.shape[1]
        self.valid[:, :length] = mask
        self.valid[:, length:] = True  # generated tokens are always real
        self.pad.copy_((~mask).sum(dim=1, keepdim=True))  # left padding: rotary positions start after it
        self.position.fill_(length)
        slots = self.slots[:length]
        causal = slots[None, :, None] >= self.slots[None, None, :]  # [1, T, L]
        itself = slots[None, :, None] == self.slots[None, None, :]  # a padding position sees itself: no empty row
        attend = causal & self.valid[:, None, :] | itself
        logits = self._forward(input_ids, slots, (slots[None] - self.pad).clamp(min=0), attend[:, None])
        if self.speedup in ("graph", "compile") and self.device.type == "cuda" and self._graph is None:
            self._record(logits.argmax(-1, keepdim=True))  # now, so that no timed step pays for it
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One token per sequence [batch_size, 1] after `prefill`: the logits of the next [batch_size, vocab]."""
        if self.speedup not in ("graph", "compile") or self.device.type != "cuda":
            return self._step(token)
        if self._graph is None:
            self._record(token)
        self._token.copy_(token)
        self._graph.replay()
        return self._logits.clone()

    def _step_eager(self, token: torch.Tensor) -> torch.Tensor:
        slot = self.position
        attend = (self.slots <= slot)[None, None, None, :] & self.valid[:, None, None, :]
        logits = self._forward(token, slot, slot[None] - self.pad, attend)
        self.position.add_(1)
        return logits

    def _step_fused(self, token: torch.Tensor) -> torch.Tensor:
        x = self.embed(token)  # [B, 1, C]
        cos, sin = self.rotary(x, self.position[None] - self.pad)  # [B, 1, D]
        logits = self._fused.forward(x[:, 0], cos[:, 0], sin[:, 0], self.valid, int(self.position))
        self.position.add_(1)
        return logits

    def _record(self, token: torch.Tensor) -> None:
        """Capture one step as a CUDA graph (after two warm-up steps on a side stream, as CUDA graphs
        require); the warm-up steps' cache writes land in slots that later steps overwrite."""
        start = self.position.clone()
        self._token = token.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(self._token)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step(self._token)
        self.position.copy_(start)

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
               eos_token_id: int | None = None, pad_token_id: int = 0, min_new_tokens: int = 0) -> torch.Tensor:
        """Greedy continuation [batch_size, ≤ max_new_tokens] (pad after a sequence's EOS), as
        transformers' `generate(do_sample=False)`. It stops early once every sequence has ended,
        checking every 8 tokens (reading a flag from the device costs a GPU its pipelining)."""
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_length={self.max_length}")
        logits = self.prefill(input_ids, attention_mask)
        done = torch.zeros(self.batch_size, 1, dtype=torch.bool, device=self.device)
        tokens = []
        for i in range(max_new_tokens):
            if eos_token_id is not None and i < min_new_tokens:
                logits[:, eos_token_id] = float("-inf")
            token = logits.argmax(-1, keepdim=True).masked_fill(done, pad_token_id)
            tokens.append(token)
            if eos_token_id is not None:
                done = done | (token == eos_token_id)
                if i % 8 == 7 and bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = self.step(token)
        return torch.cat(tokens, dim=1)

    # ------------------------------------------------------------------ the hot path: no checks, no syncs

    def _forward(self, ids, slots, positions, attend):
        x = self.embed(ids)
        batch, length, _ = x.shape
        heads, kv, dim = self.n_heads, self.n_kv, self.head_dim
        cos, sin = self.rotary(x, positions)  # [B, T, D]
        cos, sin = cos[:, :, None], _signed_sin(sin)[:, :, None]  # broadcast over heads: [B, T, 1, D]
        if length == 1:  # one token: attention by hand, the mask as 0 / −inf added once per step
            bias = torch.zeros(attend.shape, dtype=self.dtype, device=self.device).masked_fill_(~attend, float("-inf"))
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            h = _rms_norm(x, layer["norm1"])
            qkv = layer["qkv"](h).view(batch, length, heads + 2 * kv, dim)
            qk = qkv[:, :, :heads + kv]  # q and k heads rotated together: rotate_half(x) = roll(x) · ±1
            qk = qk * cos + qk.roll(dim // 2, dims=-1) * sin
            q, k, v = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), qkv[:, :, heads + kv:].transpose(1, 2)
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
            if length == 1:
                attention = _attend_one(q, k_cache, v_cache, bias, layer["scaling"])
            else:
                attention = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=attend,
                                                           scale=layer["scaling"], enable_gqa=True).transpose(1, 2)
            x = x + layer["o"](attention.reshape(batch, length, -1))
            h = _rms_norm(x, layer["norm2"])
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](layer["act"](gate) * up)
        return self.lm_head(_rms_norm(x[:, -1], self.norm)).float()


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Llama's RMSNorm with the model's own weight and epsilon: x / sqrt(mean(x²) + ε) · w."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) · sin = roll(x, D/2) · signed sin, exactly
    (rotate_half(x) = cat(−x₂, x₁), roll(x, D/2) = cat(x₂, x₁)), one roll instead of a neg and a cat."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _attend_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:
    """softmax(q·Kᵀ · scale + bias)·V for one new token per sequence, grouped-query: q [B, H, 1, D],
    the caches [B, H_kv, L, D], head h reading kv head h // (H / H_kv) as transformers' repeat_kv
    does; bias [B, 1, 1, L] is 0 or −inf. Returns [B, 1, H, D]. Five small ops instead of the
    general attention kernel, which costs more than the arithmetic at one token."""
    batch, heads, _, dim = q.shape
    groups = q.reshape(batch, k_cache.shape[1], heads // k_cache.shape[1], dim)  # [B, H_kv, H/H_kv, D]
    scores = torch.matmul(groups, k_cache.transpose(-1, -2)).mul_(scale).add_(bias)  # [B, H_kv, H/H_kv, L]
    return torch.matmul(scores.softmax(-1), v_cache).view(batch, 1, heads, dim)


@torch.no_grad()
def generate_tokens(model: nn.Module, batch, max_new_tokens: int, min_new_tokens: int | None,
                    pad_token_id: int, sampling: dict) -> torch.Tensor:
    """The new tokens [B, n] of `model.generate(**batch, ...)`: greedy decoding of a model `Decoder`
    supports runs `Decoder.greedy`; sampling, other architectures and several EOS ids fall back to
    transformers' `generate` (`models.generate` calls this)."""
    ids = batch["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) and len(eos) == 1 else eos
    config = model.generation_config
    plain = getattr(config, "repetition_penalty", None) in (None, 1.0) and not getattr(config, "no_repeat_ngram_size", 0)
    if not sampling.get("do_sample") and plain and supports(model)[0] and not isinstance(eos, (list, tuple)):
        decoder = Decoder(model, ids.shape[0], ids.shape[1] + max_new_tokens + 1)
        return decoder.greedy(ids, max_new_tokens, batch.get("attention_mask"), eos, pad_token_id, min_new_tokens or 0)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         pad_token_id=pad_token_id, **sampling)
    return out[:, ids.shape[1]:]
