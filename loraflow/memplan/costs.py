"""The cost model: every measured constant the search trades memory against speed with, in one place,
each with the measurement it comes from."""
from __future__ import annotations

from .estimate import Arch, Setup

SAFETY_MARGIN = 0.10
"""Share of the budget kept free: the plan's stated accuracy, plus allocator fragmentation."""

OCCUPANCY_TOKENS = 800
"""Micro-batch size at which a step runs at half its best rate per token: on the H200, 8B LoRA ran
2048-token micro-batches at 0.754 of the rate of 16384-token ones (benchmarks/results/train-h200-run1.jsonl),
and T / (T + 800) fits that ratio."""

EMBEDDING_ON_CPU_COST = 0.02
"""Share of step time the input embedding in CPU memory costs. On the H200, P2 (8B LoRA, 4 x 2048
tokens) with the embedding in CPU memory and one layer fewer checkpointed (1.0% less work by
relative_step_cost) ran 0.4% slower than with it on the GPU (benchmarks/results/train-h200-run9-p1-p2.jsonl),
so the move cost about 1.4% when the CPU looked the rows up. The GPU now gathers them from pinned
memory itself (loraflow/host_rows.py), which should cost less; that is not measured alone, and 2%
still keeps the plan from moving the embedding for a gain that small."""

OFFLOAD_CHECKPOINTS_COST = 0.02
"""Share of step time that offloading the checkpointed inputs costs, with the copies overlapped (a
layer's input is 8 KB a token at 8B, about 1 ms per 8,192 tokens each way over the H200's PCIe 5,
against ~5 ms of the layer's compute). Measured on T2 (8B LoRA, 24 GiB budget, H200 run 14,
benchmarks/results/train-h200-run14.jsonl): micro-batch 8 with every layer checkpointed and offloaded
ran 11,187 tok/s, micro-batch 4 with 31 layers checkpointed in GPU memory 10,984 (mean of two runs);
by relative_step_cost that puts offloading's own cost at 1.7%. (On T3, QLoRA at 8 GiB, offloading
let micro-batch 4 fit: 10,211 tok/s against 8,112 at micro-batch 2, a gain the occupancy term
underrates for 4-bit weights, so T3 cannot calibrate it.)"""

HOST_COPY_BYTES_PER_S = 55e9
"""GPU -> host copy rate with nothing coming the other way, as in the forward pass, where only the
stashes go out (H100, PCIe 5 x16, benchmarks/host_copy_probe.py in benchmarks/results/train-h100-run16.jsonl:
55.4 GB/s each way alone, 50.0-50.9 each way with both ways running; a GEMM beside the copies kept its
rate, 723 TFLOP/s against 731 alone). The forward's trace (run 19) moved 470 MB up outputs at 55 GB/s."""

LAYER_FORWARD_OVER_PROJECTIONS = 1.19
"""A decoder layer's forward time over its projections' FLOPs at MATMUL_FLOP_PER_S: the attention, the
norms, RoPE, SwiGLU, the residual adds and the LoRA matrices' passes take the rest. Measured in the
H100 trace of T2 (8B, 8 x 2048 tokens, run 19): 11.7 ms a layer from one RMSNorm to the next against
9.8 ms of projection FLOPs. Longer rows make attention a larger share, so for them this errs short,
which stashes fewer layers than the link could carry, not more."""

MATMUL_FLOP_PER_S = 730e12
"""bf16 GEMM rate at a decoder layer's projection shapes (16384 x 4096 x 14336: 724-731 TFLOP/s on
the H100 in the same file; the H200's MLP GEMMs ran 745 in its profile, train-h200-unsloth.md)."""

FUSED_LAYERS_MIN_TOKENS = 4096
"""Below this many tokens per micro-batch the fused layer kernels are left off: each Liger call costs
about 1 ms of host time (profiled on the H200, benchmarks/results/profile-qlora-p3-h200.txt, where
the GPU was busy 34% of an 8B QLoRA step at 2048 tokens), more than the plain ops' GPU time saves.
The fused cross-entropy is one call a step and stays on."""


def projection_share(arch: Arch, name: str) -> float:
    """One projection's share of a decoder layer's projection FLOPs."""
    rows, cols = arch.linear_shapes()[name]
    return rows * cols * arch.layers / arch.linear_params()


def fused_offload(s: Setup, name: str) -> bool:
    """Whether offloaded checkpointed layers run projection `name` as a fused LoRA group (the groups
    carry the names offload.py stashes and skips by): fused path, one GPU, an adapted 16-bit or 4-bit
    base (8-bit bases keep peft's path)."""
    return bool(s.offload_checkpoints and s.checkpoint_layers and s.fused and s.shards == 1
                and s.method != "lora8" and name in s.targets)


def unread_down_layers(arch: Arch, s: Setup) -> int:
    """Recomputed layers that leave down_proj out (offload.unread_outputs): every offloaded one, unless
    a norm reads the MLP's output. Not timed apart: run 21 measured it with other changes
    (benchmarks/results/train-h200-unsloth.md), and run 19's profile puts the GEMM at 2.46 ms of an 8B
    layer at 16k tokens."""
    return s.checkpoint_layers if fused_offload(s, "down_proj") and not arch.mlp_output_normed else 0


def stashed_output_layers(arch: Arch, s: Setup) -> int:
    """How many offloaded checkpointed layers also stash their up_proj output in CPU memory
    (loraflow/offload.py): as many as the forward pass's GPU-to-host copies keep pace with. Per token,
    a layer's forward takes its projections' FLOPs at MATMUL_FLOP_PER_S times
    LAYER_FORWARD_OVER_PROJECTIONS, and its input and up_proj output take their bytes at
    HOST_COPY_BYTES_PER_S; the layers left over recompute it. At 8B every layer keeps pace; at the
    Qwen2.5-7B shape (wider MLP, narrower hidden) about seven in eight.
    Only fused LoRA groups stash (loraflow/fused_lora.py), so only with up_proj adapted and the fused
    path on one GPU. Measured on the H100 (benchmarks/results/train-h100-run17.jsonl): T2 +2.9% (23 of
    31 layers stash, by the both-ways rate and the projections alone then), T4 +3.0% (17 of 27), where
    relative_step_cost says 7.0% and 6.3%: it counts a layer's forward as its projections alone. The
    plan adds stashing to its choice rather than ranking choices by it (search.with_stashed_outputs), so
    the overstatement moves no choice."""
    if not fused_offload(s, "up_proj"):
        return 0
    forward = LAYER_FORWARD_OVER_PROJECTIONS * 2 * arch.linear_params() / arch.layers / MATMUL_FLOP_PER_S
    copy_input = s.act_bytes * arch.hidden / HOST_COPY_BYTES_PER_S
    copy_up = s.act_bytes * arch.intermediate / HOST_COPY_BYTES_PER_S
    share = min(1.0, max(0.0, (forward - copy_input) / copy_up))
    return int(share * s.checkpoint_layers)


def relative_step_cost(arch: Arch, s: Setup) -> float:
    """Time per token relative to no recomputation at full occupancy: a frozen base costs ~2 units
    forward and ~2 backward, each checkpointed layer adds its forward again (less its up_proj where
    that output is stashed, and its down_proj where backward never reads that output), small
    micro-batches leave the GPU partly idle, and the embedding in CPU memory adds its copy."""
    left_out = (s.stashed_outputs * projection_share(arch, "up_proj")
                + unread_down_layers(arch, s) * projection_share(arch, "down_proj"))
    recompute = (4 + 2 * (s.checkpoint_layers - left_out) / arch.layers) / 4
    offload = 1 + EMBEDDING_ON_CPU_COST if s.embedding_on_cpu else 1
    if s.offload_checkpoints and s.checkpoint_layers:
        offload *= 1 + OFFLOAD_CHECKPOINTS_COST
    return recompute * offload * (s.tokens + OCCUPANCY_TOKENS) / s.tokens
