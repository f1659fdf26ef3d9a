"""Batch-invariant forward passes for generation: each row of a batch is computed exactly as it would be
alone, so batched greedy outputs equal one-row-at-a-time outputs token for token, in bf16 on a GPU too.

Inside `with batch_invariant(model, batch, slots) as cache:`
- every plain nn.Linear and every Llama-style RMSNorm runs a fixed-configuration kernel
  (loraflow.invariant_kernels) on CUDA; q/k/v and gate/up run as one launch each, SiLU(gate) x up
  one, the rotary embedding one for queries and keys, and the K/V cache writes one;
- attention reads a `RowKVCache`, where each row's keys start at position 0 of its own run of slots,
  sized by its own length, so a row's keys sit at the same positions whatever the batch; prefill packs
  the rows' prompts into one sequence with no padding, and each row's query tiles start at its own
  first token;
- on CPU the same structure runs on PyTorch ops (float32 there, which the tests compare).
Only the model types below are taken; others fall back to HF generate (see loraflow.generation).
Quantized (bitsandbytes) linears are left as they are, so their rows are not guaranteed invariant.
"""
from __future__ import annotations

import itertools
import sys
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

ATTENTION = "loraflow_rows"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RMSNorms with LlamaRMSNorm's formula: fp32 variance, cast to the input dtype, then times weight
NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)); with act_fn SiLU the middle is one kernel
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def unsupported_reason(model, on_gpu: bool | None = None) -> str | None:
    """Why `batch_invariant` cannot run this model (on the GPU kernels: on_gpu, by default where the
    model is), or None."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "use_sliding_window", False) or (config.model_type == "mistral" and config.sliding_window):
        return "sliding-window attention"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    on_kernels = model.device.type == "cuda" if on_gpu is None else on_gpu  # CPU runs PyTorch ops, any head_dim
    if on_kernels and (head_dim & (head_dim - 1) or head_dim < 16):  # the GPU kernels tile a head in powers of two
        return f"head_dim {head_dim} (the GPU kernels take powers of two from 16)"
    return None


class RowKVCache:
    """The decode state of one generation loop. Per layer, K/V buffers (kv_heads, slots, head_dim): one
    pool of token slots, zero-filled so unwritten slots are finite and masked attention adds exact zeros.
    Each row of a batch holds a run of slots from `starts[b]` (`place_rows`), as many as its own prompt
    and new tokens need, so a batch of short prompts beside one long one does not reserve the long one's
    length for every row (`loraflow.memplan.cache_slots` sizes the pool). `positions[b]`: where row b's
    next query sits. A call is either a decode step (one token for every row) or a prefill of some rows'
    prompts packed into one sequence, no padding, each from position 0 of its row (`segments`: the row's
    first slot, first token, length). `token_slots` says where each token of the call writes its keys and
    values, worked out once per call, not per layer. The linears' and attention's kernel configurations
    follow `decode`: set by the loop, never inferred from shapes, so a row alone and in a batch take the
    same kernel."""

    def __init__(self, config, batch: int, slots: int, dtype: torch.dtype, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_key_value_heads, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots = slots
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.starts = torch.zeros(batch, dtype=torch.long, device=device)  # read by the decode graph: update in place
        self.first_slots = [0] * batch
        self.begin_decode()

    def place_rows(self, capacities: list[int]) -> None:
        """Give row b of the next batch capacities[b] slots, one run after another."""
        first = [0, *itertools.accumulate(capacities)]
        if len(capacities) != len(self.first_slots) or first[-1] > self.slots:
            raise ValueError(f"{len(capacities)} rows needing {first[-1]} cache slots; the cache has "
                             f"{len(self.first_slots)} rows and {self.slots} slots")
        self.first_slots = first[:-1]
        self.starts.copy_(torch.tensor(self.first_slots))

    def begin_decode(self) -> torch.Tensor:
        """The next call is a decode step: one token per row, at the row's position. Returns the
        call's position ids (batch, 1)."""
        self.decode, self.segments, self.blocks = True, [], None
        self.token_slots = (self.starts + self.positions)[:, None]
        return self.positions[:, None]

    def begin_prefill(self, first_row: int, lengths: list[int]) -> torch.Tensor:
        """The next call is the prefill of rows first_row.. (prompts of `lengths` tokens), packed into one
        sequence. Returns the call's position ids (1, total)."""
        first_tokens = [0, *itertools.accumulate(lengths)][:-1]  # in the packed sequence, not the cache
        slots = self.first_slots[first_row:first_row + len(lengths)]
        self.decode, self.blocks = False, None
        self.segments = list(zip(slots, first_tokens, lengths))
        device = self.positions.device
        positions = torch.cat([torch.arange(n) for n in lengths])
        self.token_slots = (torch.tensor(slots).repeat_interleave(torch.tensor(lengths)) + positions)[None].to(device)
        return positions[None].to(device)

    def update(self, key, value, layer_idx, *args, **kwargs):
        """Write the call's keys and values (B, Hkv, L, D) to their slots; returns the whole caches, which
        attention reads by row."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if _on_kernels(key):
            from loraflow import invariant_kernels
            invariant_kernels.write_kv(k, v, key, value, self.token_slots)
        else:
            slots = self.token_slots.reshape(-1)
            k[:, slots] = key.transpose(0, 1).flatten(1, 2)  # (Hkv, tokens, D)
            v[:, slots] = value.transpose(0, 1).flatten(1, 2)
        return k, v


def reference_attention(q, k, v, starts, positions, scale):
    """PyTorch version of the kernels' attention: query i of row b sits at positions[b] + i and sees
    keys 0..that position, which sit in the slots from starts[b]. q (B, H, Lq, D); k, v (Hkv, slots, D);
    returns (B, Lq, H, D)."""
    groups = q.shape[1] // k.shape[0]
    query_pos = positions[:, None] + torch.arange(q.shape[2], device=q.device)  # (B, Lq)
    span = torch.arange(int(query_pos.max()) + 1, device=q.device)
    # each row's keys 0..its last query's position, gathered to (B, Hkv, span, D); later slots masked
    slots = (starts[:, None] + span).clamp(max=k.shape[1] - 1)
    k, v = (t[:, slots].transpose(0, 1).repeat_interleave(groups, 1) for t in (k, v))
    visible = span[None, None, :] <= query_pos[:, :, None]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype).transpose(1, 2)


def reference_prefill_attention(q, k, v, segments, scale):
    """reference_attention over packed rows: q (1, H, T, D), segments (first cache slot, first token, length)."""
    zero = torch.zeros(1, dtype=torch.long, device=q.device)
    return torch.cat([reference_attention(q[:, :, first:first + n], k, v, zero + slot, zero, scale)
                      for slot, first, n in segments], dim=1)


def row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over a RowKVCache, which the loop passes as the model call's
    `loraflow_cache` keyword: its phase picks the kernel, its positions or segments place the queries."""
    cache: RowKVCache = kwargs["loraflow_cache"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    on_kernels = _on_kernels(query)
    if on_kernels:
        from loraflow import invariant_kernels
    if cache.decode:
        if on_kernels:
            return invariant_kernels.decode_attention(query, key, value, cache.starts, cache.positions, scale), None
        return reference_attention(query, key, value, cache.starts, cache.positions, scale), None
    if on_kernels:
        if cache.blocks is None:  # once per call, not per layer
            cache.blocks = invariant_kernels.prefill_blocks(cache.segments, query.device)
        return invariant_kernels.prefill_attention(query, key, value, cache.blocks, scale), None
    return reference_prefill_attention(query, key, value, cache.segments, scale), None


def _on_kernels(x) -> bool:
    """The Triton kernels take half-precision CUDA tensors; anything else runs the PyTorch op."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _linear(module: nn.Linear, cache: RowKVCache, x):
    if _on_kernels(x):
        from loraflow import invariant_kernels
        return invariant_kernels.matmul(x, module.weight, module.bias, decode=cache.decode)
    return nn.functional.linear(x, module.weight, module.bias)


# Linears of one module that read the same input: one launch computes them all on the kernels
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _ProjectionGroup:
    """q/k/v (or gate/up) as one launch on the kernels: the first member called computes every member's
    output (loraflow.invariant_kernels.matmul_group, each column as its own matmul would round it) and
    the others, called next with the same input, take theirs. A member called with another input, or
    again, computes afresh, so a model that calls them otherwise still gets what nn.Linear gives."""

    def __init__(self, members: list[nn.Linear], cache: "RowKVCache"):
        self.members, self.cache = members, cache
        self.input, self.pending = None, {}

    def __call__(self, index: int, x):
        if self.input is x and index in self.pending:
            out = self.pending.pop(index)
            if not self.pending:
                self.input = None  # holds no activation past the layer
            return out
        outs = self.compute(x)
        self.input, self.pending = x, {i: o for i, o in enumerate(outs) if i != index}
        return outs[index]

    def compute(self, x):
        if _on_kernels(x):
            from loraflow import invariant_kernels
            return invariant_kernels.matmul_group(x, [m.weight for m in self.members], [m.bias for m in self.members],
                                                  decode=self.cache.decode)
        return [nn.functional.linear(x, m.weight, m.bias) for m in self.members]


def projection_groups(model) -> list[list[nn.Linear]]:
    """Each module's q/k/v and gate/up linears, where all are plain nn.Linear of one input width and
    all or none have a bias (the kernel's terms)."""
    groups = []
    for module in model.modules():
        for names in PROJECTION_GROUPS:
            members = [getattr(module, n, None) for n in names]
            if all(type(m) is nn.Linear for m in members) and len({m.in_features for m in members}) == 1 \
                    and len({m.bias is None for m in members}) == 1:
                groups.append(members)
    return groups


def _rope(original, q, k, cos, sin, *args, **kwargs):
    """transformers' apply_rotary_pos_emb, one launch per tensor on the kernels, each product and the sum
    rounded as the eager formula rounds them (tests/triton_interpret_check.py compares them bitwise)."""
    if _on_kernels(q) and not args and not kwargs and cos.shape[-1] == q.shape[-1] and cos.dim() == 3:
        from loraflow import invariant_kernels
        return invariant_kernels.rope(q, k, cos, sin)
    return original(q, k, cos, sin, *args, **kwargs)


def _silu_mlp(module, original, x):
    """The MLP with SiLU(gate) x up in one launch on the kernels (gate and up still one launch, through
    their projection group); otherwise the module's own forward."""
    if _on_kernels(x):
        from loraflow import invariant_kernels
        return module.down_proj(invariant_kernels.silu_mul(module.gate_proj(x), module.up_proj(x)))
    return original(x)


def _is_silu_mlp(module) -> bool:
    return type(module).__name__ in MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


def _rms_norm(module, original, x):
    if _on_kernels(x):
        from loraflow import invariant_kernels
        return invariant_kernels.rms_norm(x, module.weight, module.variance_epsilon)
    return original(x)


@contextmanager
def batch_invariant(model, batch: int, slots: int):
    """Run `model` with the batch-invariant linears, norms and row attention, over a RowKVCache of
    `batch` rows and `slots` token slots, which it yields; the model is restored on exit."""
    from transformers import AttentionInterface
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"batch-invariant generation does not support {reason}")
    AttentionInterface.register(ATTENTION, row_attention)  # no mask function: the kernels mask by position
    cache = RowKVCache(model.config, batch, slots, model.dtype, model.device)
    patched, grouped = [], set()
    for members in projection_groups(model):
        group = _ProjectionGroup(members, cache)
        for index, m in enumerate(members):
            m.forward = partial(group, index)
            patched.append(m)
            grouped.add(id(m))
    for m in model.modules():
        if id(m) in grouped:
            continue
        if type(m) is nn.Linear:
            m.forward = partial(_linear, m, cache)
            patched.append(m)
        elif type(m).__name__ in NORM_CLASSES:
            m.forward = partial(_rms_norm, m, m.forward)
            patched.append(m)
        elif _is_silu_mlp(m):
            m.forward = partial(_silu_mlp, m, m.forward)
            patched.append(m)
    # the modeling module's own apply_rotary_pos_emb, which its attention looks up when called
    modeling = sys.modules[type(model).__module__]
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is not None:
        modeling.apply_rotary_pos_emb = partial(_rope, rope)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield cache
    finally:
        config._attn_implementation = previous
        if rope is not None:
            modeling.apply_rotary_pos_emb = rope
        for m in patched:
            del m.forward  # back to the class's forward
