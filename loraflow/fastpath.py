"""The fast training path: padding-free packing with attention kept per row, fused kernels, no fp32
upcast of frozen weights, and checkpointing of only the layers the memory plan picks.

Packing: the rows of a micro-batch are laid end to end in one sequence of the tokens they really
have. position_ids restart at 0 for each row (so RoPE sees each row as it would alone) and
cu_seq_lens mark where rows begin, so attention never crosses a row boundary:
- on a GPU, PyTorch's own FlashAttention-2 varlen kernel (aten::_flash_attention_forward), which
  ships inside torch, so no flash-attn package is needed;
- elsewhere, scaled_dot_product_attention on each row's slice (exact, slower: CPU tests only).
The first label of every row is -100, so no row is trained to predict the next row's first token.
"""
from __future__ import annotations

import logging

import torch

from loraflow.masking import IGNORE_INDEX

log = logging.getLogger("loraflow.fastpath")
PACKED_ATTENTION = "loraflow_packed"


def packed_collator(pad_id: int):
    """Rows -> one packed row: input_ids, labels, position_ids (1, total) and the row boundaries."""
    del pad_id  # packed rows have no padding

    def collate(rows: list[dict]) -> dict:
        ids, labels, positions, bounds = [], [], [], [0]
        for r in rows:
            n = len(r["input_ids"])
            ids.extend(r["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(r["labels"][1:])
            positions.extend(range(n))
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}
    return collate


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed row. query (1, heads, total, d), key/value (1, kv_heads, total, d);
    returns (1, total, heads, d) as transformers' attention functions do."""
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        raise RuntimeError("packed attention needs cu_seq_lens_q: batches must come from packed_collator")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, d)
    if q.is_cuda:
        cu = cu.to(q.device, torch.int32)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if not dropout and cudnn_attention_usable(q.device):
            out = CudnnPackedAttention.apply(q, k, v, cu, longest, scaling)
        else:
            out = torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, longest, longest, float(dropout), True, False, scale=scaling)[0]
    else:
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            if groups > 1:
                ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
    return out.unsqueeze(0), None


def expand_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(total, kv_heads, d) -> (total, kv_heads * groups, d), each key/value head repeated for the
    query heads that share it, in the order transformers' repeat_kv uses."""
    if groups == 1:
        return t
    total, heads, d = t.shape
    return t[:, :, None, :].expand(total, heads, groups, d).reshape(total, heads * groups, d)


def cudnn_kernels():
    """cuDNN's varlen attention, forward and backward, as aten exposes them (CUDA builds only)."""
    def forward(q, k, v, cu, longest, scale):
        r = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, longest, longest, True, 0.0, True, False,
                                                    scale=scale)
        return r[0], r[1], (r[6], r[7])  # output, logsumexp, the (unused, dropout-free) philox state

    def backward(dout, q, k, v, out, lse, rng, cu, longest, scale):
        return torch.ops.aten._cudnn_attention_backward(dout, q, k, v, out, lse, rng[0], rng[1], q.new_empty(0),
                                                        cu, cu, longest, longest, 0.0, True, scale=scale)
    return forward, backward


class CudnnPackedAttention(torch.autograd.Function):
    """Causal attention within packed rows through cuDNN's varlen kernel, which on the H200 ran 1.4x
    FlashAttention-2's speed at 8B shapes (benchmarks/attention_probe.py). torch's entry point takes as
    many key/value heads as query heads, so grouped heads are expanded for each call and never kept:
    backward expands them again and sums each group's gradients back onto its shared head. The
    expansions live only while one layer's attention runs, inside the plan's working set (whose MLP
    term, 3 x intermediate per token, is larger than these 4 x hidden)."""
    kernels = staticmethod(cudnn_kernels)

    @staticmethod
    def forward(ctx, q, k, v, cu, longest, scale):
        groups = q.shape[1] // k.shape[1]
        forward, _ = CudnnPackedAttention.kernels()
        out, lse, rng = forward(q, expand_heads(k, groups), expand_heads(v, groups), cu, longest, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, *rng)
        ctx.longest, ctx.scale, ctx.groups = longest, scale, groups
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, *rng = ctx.saved_tensors
        _, backward = CudnnPackedAttention.kernels()
        g = ctx.groups
        dq, dk, dv = backward(dout.contiguous(), q, expand_heads(k, g), expand_heads(v, g), out, lse, rng, cu,
                              ctx.longest, ctx.scale)
        total, heads, d = k.shape
        dk, dv = (t.view(total, heads, g, d).sum(2) for t in (dk, dv))
        return dq, dk, dv, None, None, None


_cudnn_usable: dict = {}


def cudnn_attention_usable(device) -> bool:
    """Whether cuDNN's varlen attention runs here and computes what FlashAttention-2 computes, checked
    once per device on uneven packed rows, forward and backward; FlashAttention-2 stays otherwise."""
    key = str(device)
    if key not in _cudnn_usable:
        _cudnn_usable[key] = _cudnn_matches_flash(device)
        log.info("packed attention on %s: %s", key, "cuDNN varlen" if _cudnn_usable[key] else "FlashAttention-2 varlen")
    return _cudnn_usable[key]


def _cudnn_matches_flash(device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    lengths = [37, 300, 5, 130]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    total, longest = sum(lengths), max(lengths)
    q, k, v, dout = (torch.randn(total, h, 128, device=device, dtype=torch.bfloat16, generator=g)
                     for h in (8, 2, 2, 8))
    grads = []
    try:
        for use_cudnn in (False, True):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            if use_cudnn:
                out = CudnnPackedAttention.apply(*leaves, cu, longest, None)
            else:
                out = torch.ops.aten._flash_attention_forward(*leaves, cu, cu, longest, longest, 0.0, True, False)[0]
            out.backward(dout)
            grads.append([out.detach().float()] + [t.grad.float() for t in leaves])
    except (RuntimeError, NotImplementedError) as e:  # no cuDNN attention in this build, or not on this GPU
        log.info("cuDNN varlen attention unavailable: %s", str(e).splitlines()[0][:200])
        return False
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(grads[1], grads[0]))
    return worst < 2e-2


def no_mask(*args, **kwargs):
    """Packed attention takes its row boundaries from cu_seq_lens, not from a mask."""
    return None


def register_packed_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, no_mask)
    return PACKED_ATTENTION


def apply_fused_kernels(model, layers: bool = True) -> bool:
    """Liger's fused linear cross-entropy on this model instance, and with `layers` its fused RMSNorm,
    SwiGLU and RoPE. False when Liger is not installed or does not know the architecture; the plain
    modules then stay."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError as e:
        log.info("fused kernels unavailable (%s): plain modules", e)
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.info("no fused kernels for model type %s: plain modules", model.config.model_type)
        return False
    _apply_liger_kernel_to_instance(model=model, rope=layers, rms_norm=layers, swiglu=layers,
                                    fused_linear_cross_entropy=True, cross_entropy=False)
    return True


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model, count: int) -> int:
    """Recompute the first `count` decoder layers in backward (non-reentrant); keep the rest's
    activations. Returns how many layers are checkpointed."""
    layers = decoder_layers(model)
    if count <= 0 or not layers:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # the checkpointed input must carry grad with a frozen embedding
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count
    return min(count, len(layers))


def keep_adapter_inputs_in_compute_dtype(model) -> None:
    """peft casts each LoRA input to the adapter's fp32 dtype, which saves an extra fp32 copy of it per
    projection; under autocast the matmul runs in bf16 anyway, so skip the cast."""
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = False


class CpuEmbedding(torch.nn.Module):
    """A frozen input embedding kept in CPU memory: ids are looked up there and the rows copied to the
    ids' device. The original module is held outside the registered state, so moving the model
    (Trainer's model.to(device)) leaves it where it is; the lookup is exact, so the math is unchanged."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self._table = [embedding.to("cpu")]

    @property
    def weight(self) -> torch.Tensor:
        return self._table[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._table[0](ids.to("cpu")).to(ids.device)


def keep_input_embedding_on_cpu(model) -> int:
    """Swap the (frozen, untied) input embedding for a CpuEmbedding; returns the GPU bytes freed.
    Call it before checkpoint_layers, whose input-grad hook goes on the embedding module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    if isinstance(embedding, CpuEmbedding):
        return 0
    head = base.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        raise ValueError("the input embedding is tied to the output head, which stays on the GPU")
    if any(p.requires_grad for p in embedding.parameters()):
        raise ValueError("the input embedding is trained (in full or by an adapter), so it stays on the GPU")
    freed = embedding.weight.numel() * embedding.weight.element_size() if embedding.weight.is_cuda else 0
    base.set_input_embeddings(CpuEmbedding(embedding))
    return freed


def params_kept_on_cpu(model) -> int:
    """Parameters a CpuEmbedding holds outside the registered state, which model.parameters() misses."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, CpuEmbedding))
