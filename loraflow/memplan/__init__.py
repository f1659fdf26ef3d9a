"""The memory plan: peak GPU memory of a LoRA training step, predicted from the model's config before
any weight is loaded, and the fastest settings that fit a budget.

    peak = weights + adapter + saved activations + logits/loss + working set

Each term is bytes per parameter or bytes per token, from what the step keeps alive:
- weights: bf16 (lora), int8 + one fp32 scale per output row (lora8), or nf4 packed two per byte
  with 8-bit block scales and fp32 second-level scales (qlora, double quant); embeddings, the
  output head and norms stay bf16, as bitsandbytes leaves them. The frozen input embedding may be
  kept in CPU memory instead (embedding_on_cpu: 1 GiB at 8B, a fifth of a QLoRA base).
- adapter: LoRA A/B in fp32 (peft's default), their fp32 grads, the optimizer's two moments, and
  one bf16 copy (the fused projections' cast weights, kept between optimizer steps). modules_to_save are whole copies in the weight dtype;
  trainable token rows (a base's chat tokens) are rows of the embedding and head, with their own
  grads and moments.
- token_rows: the whole matrices those rows cost during the step (PEFT's merged copy of the head's
  weight and the dense gradients of the embedding and head), only when token rows are trained.
- activations: the tensors autograd saves per token in a LLaMA-style decoder layer (listed in
  `layer_saved_bytes`); a checkpointed layer keeps only its input, and not even that on the GPU
  when the inputs are offloaded to CPU memory (offload_checkpoints; two of them then join the
  working set: the one being recomputed and the one fetched ahead). Some of those layers stash their
  up_proj output there as well (stashed_output_layers); the next one's, fetched ahead, joins the
  working set, and the recompute skips that projection. The recompute also leaves down_proj out
  where no backward node reads its output (unread_down_layers: time, not memory; the empty tensor
  standing in for it is as large).
- logits/loss: a fused linear cross-entropy keeps one hidden-sized gradient per token; the plain
  path keeps fp32 log-probabilities over the vocabulary and their gradients.
- working set: the gradients alive while one layer runs backward, one recomputed layer when any is
  checkpointed, and one dequantized weight for 8-bit/4-bit bases.
- With some layers checkpointed and some kept, activations and working set are those of the larger
  of two phases of backward (`backward_phases`): the kept (last) layers' backward, with every
  activation alive and nothing recomputed, or the first recompute, after the kept layers are freed.

The per-token terms are checked against autograd's saved-tensor hooks on CPU (tests/test_memplan.py)
and the whole peak against torch.cuda.max_memory_allocated on the H200
(benchmarks/results/train-h200.md).
"""
from __future__ import annotations

from .costs import (EMBEDDING_ON_CPU_COST, FUSED_LAYERS_MIN_TOKENS, HOST_COPY_BYTES_PER_S,
                    LAYER_FORWARD_OVER_PROJECTIONS, MATMUL_FLOP_PER_S, OCCUPANCY_TOKENS, OFFLOAD_CHECKPOINTS_COST,
                    SAFETY_MARGIN, fused_offload, projection_share, relative_step_cost, stashed_output_layers,
                    unread_down_layers)
from .estimate import (FLAT_8BIT_STAGING_VALUES, GIB, LINEAR_NAMES, Arch, Setup, activation_bytes_per_token,
                       adapter_bytes, adapter_params, embedding_can_leave_gpu, estimate, fsdp_gather_bytes,
                       layer_saved_bytes, linear_weight_bytes, loss_bytes_per_token, norm_saved_bytes,
                       optimizer_step_bytes, saved_module_params, token_rows_working_bytes,
                       trains_embedding, trains_head, weight_bytes, working_bytes)
from .generation import PREFILL_CHUNK_TOKENS, cache_slots, generation_batch, generation_bytes
from .render import render
from .search import METHODS_FASTEST_FIRST, Choice, Plan, candidates, gib, make_plan, next_rung_down

__all__ = [
    "EMBEDDING_ON_CPU_COST", "FUSED_LAYERS_MIN_TOKENS", "OCCUPANCY_TOKENS", "OFFLOAD_CHECKPOINTS_COST", "SAFETY_MARGIN",
    "HOST_COPY_BYTES_PER_S", "LAYER_FORWARD_OVER_PROJECTIONS", "MATMUL_FLOP_PER_S", "relative_step_cost",
    "fused_offload", "projection_share", "stashed_output_layers", "unread_down_layers",
    "FLAT_8BIT_STAGING_VALUES", "optimizer_step_bytes", "GIB", "LINEAR_NAMES", "Arch", "Setup", "activation_bytes_per_token",
    "adapter_bytes", "adapter_params", "embedding_can_leave_gpu", "estimate", "fsdp_gather_bytes",
    "layer_saved_bytes", "linear_weight_bytes", "loss_bytes_per_token", "norm_saved_bytes",
    "saved_module_params", "token_rows_working_bytes", "trains_embedding", "trains_head", "weight_bytes",
    "working_bytes", "PREFILL_CHUNK_TOKENS", "cache_slots", "generation_batch",
    "generation_bytes", "render", "METHODS_FASTEST_FIRST", "Choice", "Plan", "candidates", "gib", "make_plan",
    "next_rung_down",
]
