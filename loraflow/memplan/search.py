"""The search: every candidate setting, fastest first by the cost model, and the first whose estimate
fits the budget; and the next rung down the memory ladder when a chosen setting still runs out."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .costs import (FUSED_LAYERS_MIN_TOKENS, SAFETY_MARGIN, relative_step_cost, stashed_output_layers,
                    unread_down_layers)
from .estimate import GIB, Arch, Setup, embedding_can_leave_gpu, estimate

METHODS_FASTEST_FIRST = ("lora", "lora8", "qlora")


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)

@dataclass(frozen=True)
class Choice:
    """One candidate setting with its estimate: parts are bytes by part, their sum under "peak"."""
    setup: Setup
    micro_batch: int
    parts: dict
    fits: bool

    @property
    def peak(self) -> float:
        """Predicted peak bytes."""
        return self.parts["peak"]

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

@dataclass
class Plan:
    arch: Arch
    chosen: Choice
    budget_bytes: float | None
    max_length: int
    rows_per_step: int
    considered: list[Choice]

    def to_dict(self) -> dict:
        c = self.chosen
        return {"arch": asdict(self.arch), "budget_gib": gib(self.budget_bytes), "safety_margin": SAFETY_MARGIN,
                "max_length": self.max_length, "rows_per_optimizer_step": self.rows_per_step,
                "fits": c.fits, "method": c.setup.method, "micro_batch": c.micro_batch,
                "grad_accum": self.rows_per_step // c.micro_batch, "checkpoint_layers": c.setup.checkpoint_layers,
                "fused": c.setup.fused, "fused_layers": c.setup.fused and c.setup.fused_layers,
                "tokens_per_micro_batch": c.setup.tokens, "gpus_sharing_weights": c.setup.shards,
                "embedding_on_cpu": c.setup.embedding_on_cpu, "offload_checkpoints": c.setup.offload_checkpoints,
                "stashed_outputs": c.setup.stashed_outputs,
                "unread_down_layers": unread_down_layers(self.arch, c.setup),
                "predicted_gib": {k: gib(v) for k, v in c.parts.items()},
                "relative_step_cost": round(relative_step_cost(self.arch, c.setup), 3),
                "considered": len(self.considered)}

def candidates(arch: Arch, base: Setup, max_length: int, rows_per_step: int, micro_batch: int | None,
               checkpoint_layers: int | None, methods: tuple[str, ...], place_embedding: bool = False,
               place_checkpoints: bool = False) -> list[Choice]:
    """Every setting the plan may pick, fastest first: a cheaper method, then the lowest
    relative_step_cost (recomputation, micro-batch occupancy, the embedding's copy), then the
    embedding on the GPU. place_embedding: try the embedding in CPU memory as well as on the GPU;
    else keep base.embedding_on_cpu. place_checkpoints: likewise for the checkpointed layers' inputs
    (offloaded or on the GPU), else keep base.offload_checkpoints."""
    batches = [micro_batch] if micro_batch else [m for m in range(rows_per_step, 0, -1) if rows_per_step % m == 0]
    ckpts = [checkpoint_layers] if checkpoint_layers is not None else list(range(arch.layers + 1))
    if place_embedding and embedding_can_leave_gpu(arch, base):
        offloads = [False, True]
    else:
        offloads = [base.embedding_on_cpu]
    stash_places = [False, True] if place_checkpoints and base.shards == 1 else [base.offload_checkpoints]
    out = []
    for method in methods:
        for k in ckpts:
            for m in batches:
                for offload in offloads:
                    for stash in stash_places if k else [False]:
                        tokens = m * max_length
                        s = replace(base, method=method, checkpoint_layers=k, tokens=tokens, embedding_on_cpu=offload,
                                    offload_checkpoints=stash, fused_layers=base.fused and tokens >= FUSED_LAYERS_MIN_TOKENS)
                        out.append(Choice(s, m, estimate(arch, s), False))
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(out, key=lambda c: (rank[c.setup.method], relative_step_cost(arch, c.setup),
                                      c.setup.embedding_on_cpu, c.setup.offload_checkpoints))

def make_plan(arch: Arch, base: Setup, max_length: int, rows_per_step: int, budget_bytes: float | None,
              micro_batch: int | None = None, checkpoint_layers: int | None = None,
              methods: tuple[str, ...] | None = None, place_embedding: bool = False,
              place_checkpoints: bool = False) -> Plan:
    """The fastest candidate whose predicted peak fits the budget less the safety margin. With no
    budget (CPU) that is the fastest one. When none fits, the plan holds the smallest one, not fitting."""
    methods = methods or (base.method,)
    considered = candidates(arch, base, max_length, rows_per_step, micro_batch, checkpoint_layers, methods,
                            place_embedding, place_checkpoints)
    usable = None if budget_bytes is None else budget_bytes * (1 - SAFETY_MARGIN)
    marked = [replace(c, fits=usable is None or c.peak <= usable) for c in considered]
    fitting = [c for c in marked if c.fits]
    chosen = fitting[0] if fitting else min(marked, key=lambda c: c.peak)
    return Plan(arch, with_stashed_outputs(arch, chosen, usable), budget_bytes, max_length, rows_per_step, marked)


def with_stashed_outputs(arch: Arch, chosen: Choice, usable: float | None) -> Choice:
    """The chosen setting with up_proj outputs stashed (costs.stashed_output_layers) where it offloads
    and the fetched-ahead output still fits. An add-on to the choice, never a reason for another one:
    the occupancy term that would trade a smaller micro-batch for it underrates 4-bit bases (costs.py)."""
    s = replace(chosen.setup, stashed_outputs=stashed_output_layers(arch, chosen.setup))
    if not s.stashed_outputs or not chosen.fits:
        return chosen
    parts = estimate(arch, s)
    return replace(chosen, setup=s, parts=parts) if usable is None or parts["peak"] <= usable else chosen

def next_rung_down(plan: Plan) -> str:
    """What to try after running out of memory with this plan's setting."""
    s, arch = plan.chosen.setup, plan.arch
    if not s.embedding_on_cpu and embedding_can_leave_gpu(arch, s):
        return "the input embedding in CPU memory (train.embedding_on_cpu: true)"
    # more checkpointing helps only where it lowers the estimate: the last kept layer's activations
    # weigh about what recomputing it does (estimate.backward_phases)
    if s.checkpoint_layers < arch.layers and \
            estimate(arch, replace(s, checkpoint_layers=arch.layers))["peak"] < plan.chosen.peak * 0.99:
        return f"checkpoint more layers (train.gradient_checkpointing: {min(arch.layers, s.checkpoint_layers + max(1, arch.layers // 4))})"
    if plan.chosen.micro_batch > 1:
        return f"a smaller micro-batch (train.micro_batch: {plan.chosen.micro_batch // 2})"
    lower = METHODS_FASTEST_FIRST[METHODS_FASTEST_FIRST.index(s.method) + 1:]
    if lower:
        return f"train.method: {lower[0]}"
    return "a shorter tokenize.max_length, or a GPU with more memory"
