"""The fast training path: padding-free packing with attention kept per row, fused kernels, no fp32
upcast of frozen weights, and checkpointing of only the layers the memory plan picks.

Packing: the rows of a micro-batch are laid end to end in one sequence of the tokens they really
have. position_ids restart at 0 for each row (so RoPE sees each row as it would alone) and
cu_seq_lens mark where rows begin, so attention never crosses a row boundary:
- on a GPU, PyTorch's own FlashAttention-2 varlen kernel (aten::_flash_attention_forward), which
  ships inside torch, so no flash-attn package is needed; when every row of the micro-batch has the
  same length (fixed-length chunks, the benchmarks) the packed tensor is a dense batch as it stands,
  and cuDNN's attention runs it instead: 1.36x faster than FA2 at 8 x 2048 and 1.48x at 4 x 4096 on
  an H200 (benchmarks/results/train-h200-unsloth.md). With its native grouped-query heads it saves
  what FA2 saves, so the memory plan does not change; where this torch's cuDNN path refuses the
  shapes, the varlen kernel stays;
- elsewhere, scaled_dot_product_attention on each row's slice (exact, slower: CPU tests only).
The first label of every row is -100, so no row is trained to predict the next row's first token.
"""
from __future__ import annotations

import itertools
import logging

import torch

from loraflow.masking import IGNORE_INDEX

log = logging.getLogger("loraflow.fastpath")
PACKED_ATTENTION = "loraflow_packed"


def packed_collator(pad_id: int, trained_logits_only: bool = False):
    """Rows -> one packed row: input_ids, labels, position_ids (1, total) and the row boundaries.
    trained_logits_only: the head and the loss see only the positions whose next token is trained
    (logits_to_keep, shift_labels; see kept_logits)."""
    del pad_id  # packed rows have no padding

    def collate(rows: list[dict]) -> dict:
        # per row as tensors, not token by token in Python lists: the host collates while the GPU waits
        # at each step's start (16k tokens: 7-14 ms in lists)
        lengths = [len(r["input_ids"]) for r in rows]
        ids = torch.cat([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])
        labels = torch.cat([torch.as_tensor(r["labels"], dtype=torch.long) for r in rows])
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        labels[cu[:-1].long()] = IGNORE_INDEX  # a row's first token: nothing before it in the row predicts it
        positions = torch.cat([torch.arange(n) for n in lengths])
        longest = max(lengths)
        batch = {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None],
                 "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        if trained_logits_only:
            batch.update(kept_logits(labels))
        return batch
    return collate


SKIP_RATIO_MIN = 32


def kept_logits(labels: torch.Tensor) -> dict:
    """For packed labels (total,): the positions whose next token is trained, as the model's
    logits_to_keep, and their targets as shift_labels. The head then runs on those rows alone: in SFT
    with the prompt masked, a third to a half of the tokens, and at 8B with a 128k vocabulary the head
    is about 7% of a LoRA step's FLOPs (over 20% at 1B). Liger's fused loss and Unsloth's both compute every
    row's logits and then ignore the masked ones. The loss is the same mean over the same targets
    (the Trainer counts shift_labels for it); the skipped rows' gradient was zero. Worked out here, on
    the host, so the GPU never waits for a count. Nothing is added when fewer than 1 position in
    SKIP_RATIO_MIN would be left out: the gather and its backward pass over the hidden states cost about
    what 1 in 250 of the head's rows does (the benchmarks' rows, trained but for their first token, stay
    as they are), nor when no position is trained (an empty head is not worth a special case)."""
    shifted = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])
    trained = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    if trained.numel() == 0 or (shifted.numel() - trained.numel()) * SKIP_RATIO_MIN < shifted.numel():
        return {}
    return {"logits_to_keep": trained, "shift_labels": shifted[trained][None]}


def takes_kept_logits(model) -> bool:
    """Whether the causal LM's forward selects rows by a logits_to_keep tensor (transformers' own
    causal LMs, 5.17 and 5.25 checked, and Liger's patched forwards); an older remote-code model would
    pass it on unread, and its loss would then meet shift_labels of another length."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters  # the instance's: Liger patches it there


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed row. query (1, heads, total, d), key/value (1, kv_heads, total, d);
    returns (1, total, heads, d) as transformers' attention functions do."""
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        raise RuntimeError("packed attention needs cu_seq_lens_q: batches must come from packed_collator")
    rows = cu.numel() - 1
    if query.is_cuda and DENSE_ATTENTION and rows * longest == query.shape[2] and cudnn_takes(query, key):
        return dense_rows_attention(query, key, value, rows, scaling, CUDNN), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, d)
    if q.is_cuda:
        cu = cu.to(q.device, torch.int32)
        out = torch.ops.aten._flash_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, float(dropout), True, False,
            scale=scaling)[0]
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


# cuDNN for micro-batches of equal rows; False keeps FA2 varlen everywhere (the benchmark's A/B)
DENSE_ATTENTION = True
CUDNN = "cudnn"
_cudnn_verdicts: dict = {}  # (heads, kv heads, head dim, dtype) -> whether this torch's cuDNN runs it


def dense_rows_attention(query, key, value, rows: int, scaling, backend: str):
    """Causal attention over a packed tensor whose `rows` rows all have the same length: (1, heads,
    rows x L, d) is viewed as the dense batch (rows, heads, L, d) without a copy. Grouped-query heads
    stay grouped (enable_gqa), so nothing is expanded or saved twice. backend: "cudnn", or "math" (CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense(t):  # (1, h, rows*L, d) -> (rows, h, L, d)
        return t[0].unflatten(1, (rows, -1)).transpose(0, 1)
    q, k, v = dense(query), dense(key), dense(value)
    chosen = SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.MATH
    with sdpa_kernel([chosen]):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).flatten(0, 1).unsqueeze(0)  # (1, rows*L, heads, d)


def cudnn_takes(query, key) -> bool:
    """Whether cuDNN's attention runs these shapes on this torch (grouped-query heads included); asked
    once per shape, by trying a small batch, because the answer depends on the torch and cuDNN build.
    The first call comes from inside the model's forward, which may run without grad (an offloaded
    checkpoint's first pass) or under a checkpoint's saved-tensor hooks (which count what is saved and
    would find the trial's tensors missing in the recompute): the trial runs with grad and keeps its
    tensors to itself."""
    shape = (query.shape[1], key.shape[1], query.shape[-1], query.dtype)
    if shape not in _cudnn_verdicts:
        q = torch.zeros(1, shape[0], 128, shape[2], device=query.device, dtype=query.dtype, requires_grad=True)
        k = torch.zeros(1, shape[1], 128, shape[2], device=query.device, dtype=query.dtype, requires_grad=True)
        try:
            import warnings
            with warnings.catch_warnings(), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                warnings.simplefilter("ignore")  # torch warns why a backend refuses; the log line below says it
                dense_rows_attention(q, k, k, 1, None, CUDNN).sum().backward()
            _cudnn_verdicts[shape] = True
        except RuntimeError as e:
            log.info("cuDNN attention does not take %s heads / %s KV heads here (%s): FlashAttention-2 varlen",
                     shape[0], shape[1], str(e).splitlines()[0][:120])
            _cudnn_verdicts[shape] = False
    return _cudnn_verdicts[shape]


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


def checkpoint_layers(model, count: int, offload: bool = False, stashed_outputs: int = 0) -> int:
    """Recompute the first `count` decoder layers in backward (non-reentrant); keep the rest's
    activations. offload: those layers' inputs wait in CPU memory (loraflow/offload.py) instead of
    GPU memory, and `stashed_outputs` of them, spread evenly, keep their up projection's output there
    too (memplan.stashed_output_layers). Returns how many layers are checkpointed."""
    layers = decoder_layers(model)
    if count <= 0 or not layers:
        return 0
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # the checkpointed input must carry grad with a frozen embedding
    offloader = None
    if offload:
        from loraflow.offload import Offloader
        n = min(stashed_outputs, count)
        offloader = Offloader({i for i in range(count) if (i + 1) * n // count > i * n // count})
        model.loraflow_offloader = offloader  # for a look at what it learned (tests, debugging)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count
        if offloader is not None and i < count:
            layer._gradient_checkpointing_func = offloader.checkpoint_function(i)
    if offloader is not None and count < len(layers):  # backward meets the kept layers first
        def prefetch_first_recomputed(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor):
                offloader.prefetch_when_backward_reaches(hidden, count - 1)
        layers[-1].register_forward_hook(prefetch_first_recomputed)
    return min(count, len(layers))


def keep_adapter_inputs_in_compute_dtype(model) -> None:
    """peft casts each LoRA input to the adapter's fp32 dtype, which saves an extra fp32 copy of it per
    projection; under autocast the matmul runs in bf16 anyway, so skip the cast."""
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = False


class CpuEmbedding(torch.nn.Module):
    """A frozen input embedding kept in CPU memory. With the ids on a GPU, the table is pinned (once) and
    the GPU gathers the rows from it itself (loraflow/host_rows.py: no wait, no host work); elsewhere
    the ids are looked up on the CPU and the rows copied to the ids' device. The original module is held
    outside the registered state, so moving the model (Trainer's model.to(device)) leaves it where it
    is; either lookup is exact, so the math is unchanged."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self._table = [embedding.to("cpu")]

    @property
    def weight(self) -> torch.Tensor:
        return self._table[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from loraflow import host_rows
        embedding = self._table[0]
        # a plain lookup (padding_idx only shapes the gradient, which a frozen table has none of); a
        # subclass with its own forward (Gemma's scaled embedding) or max_norm takes the CPU's lookup
        if ids.is_cuda and type(embedding) is torch.nn.Embedding and embedding.max_norm is None:
            if not embedding.weight.is_pinned():
                embedding.weight.data = embedding.weight.data.contiguous().pin_memory()
            if host_rows.usable(embedding.weight, ids):
                return host_rows.gather(embedding.weight.detach(), ids)
        return embedding(ids.to("cpu")).to(ids.device)


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
