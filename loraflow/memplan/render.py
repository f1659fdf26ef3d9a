"""The chosen plan as a markdown table, for the log and reports/memory_plan.md."""
from __future__ import annotations

from .costs import SAFETY_MARGIN, relative_step_cost, unread_down_layers
from .estimate import GIB
from .search import Plan, gib


def render(plan: Plan, on_cpu: bool = False) -> str:
    """The plan as a markdown table, for the log and reports/memory_plan.md. on_cpu: the run trains
    on the CPU, so the table speaks of memory, not of a GPU (`loraflow plan` plans for a GPU)."""
    c, arch = plan.chosen, plan.arch
    if on_cpu:
        budget = "none (training on the CPU: the plan only sizes the micro-batch)"
    elif plan.budget_bytes is None:
        budget = "none (no GPU memory given to plan for: --budget-gib)"
    else:
        budget = f"{gib(plan.budget_bytes):.2f} GiB (keeping {SAFETY_MARGIN:.0%} free)"
    shards = c.setup.shards
    per_gpu = f"; per GPU, sharded over {shards} GPUs (FSDP FULL_SHARD)" if shards > 1 else ""
    lines = [f"memory plan: {arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab}, "
             f"{arch.params() / 1e9:.3g} B params; budget {budget}{per_gpu}",
             "", "| part | GiB |", "|---|---|"]
    lines += [f"| {k} | {v / GIB:.3f} |" for k, v in c.parts.items()]
    verdict = "fits" if c.fits else "DOES NOT FIT"
    lines += ["", f"chosen: method {c.setup.method}, micro-batch {c.micro_batch} "
              f"(grad_accum {plan.rows_per_step // c.micro_batch}), {c.setup.tokens} tokens per micro-batch, "
              f"checkpointing {c.setup.checkpoint_layers}/{arch.layers} layers, "
              f"fused cross-entropy {'on' if c.setup.fused else 'off'}, fused layer kernels "
              f"{'on' if c.setup.fused and c.setup.fused_layers else 'off'}"
              + ("" if on_cpu else f", input embedding {'in CPU memory' if c.setup.embedding_on_cpu else 'on the GPU'}")
              + (", checkpointed inputs in CPU memory" if c.setup.offload_checkpoints else "")
              + (f" ({c.setup.stashed_outputs} of those layers' up_proj outputs too)" if c.setup.stashed_outputs else "")
              + (f", down_proj left out of {unread_down_layers(arch, c.setup)} recomputes"
                 if unread_down_layers(arch, c.setup) else "")
              + f": {verdict}; "
              f"relative step cost {relative_step_cost(arch, c.setup):.2f}"]
    return "\n".join(lines)
