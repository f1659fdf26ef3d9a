"""The memory plan applied to a run: which fast-path switches this machine allows, the plan for the
train params, writing it to reports/, and the message that names the next rung down when memory runs out.
The estimate itself lives in loraflow.memplan; the train stage, `loraflow plan` and the benchmarks all
plan through here, so they agree.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loraflow import distributed, layout, memplan
from loraflow.artifacts import write_text
from loraflow.errors import LoraflowError
from loraflow.params import TrainParams

log = logging.getLogger("loraflow.train")


def setup_for_params(params: TrainParams, act_bytes: int, fused: bool, shards: int = 1,
                     trainable_tokens: int = 0) -> memplan.Setup:
    """The Setup that TrainParams describe, with trainable_tokens token rows trained (resolved from
    train.trainable_tokens); checkpoint_layers and tokens are filled in by the plan."""
    targets = memplan.LINEAR_NAMES if params.target_modules == "all-linear" else tuple(
        n for n in memplan.LINEAR_NAMES if n in params.target_modules)
    method = "lora" if params.method == "auto" else params.method
    return memplan.Setup(method=method, fused=fused, rank=params.rank, targets=targets,
                 modules_to_save=tuple(params.modules_to_save), optimizer=params.optimizer, act_bytes=act_bytes,
                 shards=shards, embedding_on_cpu=params.embedding_on_cpu is True, trainable_tokens=trainable_tokens,
                 offload_checkpoints=params.offload_checkpoints is True,
                 embedding_frozen=params.target_modules == "all-linear" or "embed_tokens" not in params.target_modules)

def fixed_checkpoint_layers(setting, layers: int) -> int | None:
    """params.gradient_checkpointing as a layer count; None when the plan picks (auto)."""
    if setting == "auto":
        return None
    if isinstance(setting, bool):
        return layers if setting else 0
    return max(0, min(int(setting), layers))

def plan_for_params(params: TrainParams, arch: memplan.Arch, max_length: int, act_bytes: int, fused: bool,
                    gpu_free_bytes: float | None, processes: int = 1, shards: int = 1,
                    trainable_tokens: int = 0) -> memplan.Plan:
    """The plan for one training process: the budget is params.memory_budget_gib, else the GPU's free
    memory, else (CPU) none. With several processes each takes rows_per_step / processes
    rows per step; `shards` of them share the weights (FSDP). method auto tries lora, lora8 and qlora,
    fastest first (GPU only; no lora8 when sharded)."""
    total = params.rows_per_step
    if total % processes:
        raise LoraflowError(f"train.rows_per_step = {total} cannot be split evenly over "
                            f"{processes} GPUs (train.num_gpus); make it a multiple of {processes}")
    rows = total // processes
    micro = None if params.micro_batch == "auto" else params.micro_batch
    if micro is not None and rows % micro:
        raise LoraflowError(f"train.micro_batch={micro} must divide the {rows} rows per step of each "
                            f"process (train.rows_per_step / GPUs)")
    budget = params.memory_budget_gib * memplan.GIB if params.memory_budget_gib else gpu_free_bytes
    methods = None
    if params.method == "auto" and budget is not None:
        methods = tuple(m for m in memplan.METHODS_FASTEST_FIRST if shards == 1 or m != "lora8")
    base = setup_for_params(params, act_bytes, fused, shards, trainable_tokens)
    if params.offload_checkpoints is True and shards > 1:
        raise LoraflowError("train.offload_checkpoints=true is for one GPU: under FSDP (num_gpus > 1) each "
                            "process already holds a share of the activations; set it to auto or false")
    if base.embedding_on_cpu and not memplan.embedding_can_leave_gpu(arch, base):
        raise LoraflowError("train.embedding_on_cpu=true needs an input embedding that is frozen (not in "
                            "modules_to_save or target_modules, no trainable_tokens), not tied to the output head, and not "
                            "sharded (num_gpus 1)")
    return memplan.make_plan(arch, base, max_length, rows, budget, micro_batch=micro,
                     checkpoint_layers=fixed_checkpoint_layers(params.gradient_checkpointing, arch.layers),
                     methods=methods, place_embedding=params.embedding_on_cpu == "auto",
                     place_checkpoints=params.offload_checkpoints == "auto" and budget is not None)


@dataclass(frozen=True)
class Speed:
    """The fast-path switches this run uses, resolved from params and the machine."""
    packing: bool
    fused: bool


def resolve_speed(params: TrainParams, model_type: str) -> Speed:
    on_gpu = torch.cuda.is_available()
    packing = on_gpu if params.packing == "auto" else params.packing
    fused = params.fused_kernels
    if fused in ("auto", True):
        available = on_gpu and importlib.util.find_spec("liger_kernel") is not None
        if available:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
            available = model_type in MODEL_TYPE_TO_APPLY_LIGER_FN
        if fused is True and not available:
            raise LoraflowError(f"train.fused_kernels=true needs a CUDA GPU and liger-kernel supporting {model_type}")
        fused = available
    return Speed(packing=packing, fused=fused)


def make_plan(params: TrainParams, config, max_length: int, speed: Speed, dtype: torch.dtype,
              fsdp_gpus: int | None = None, trainable_tokens: int = 0, vocab_size: int = 0) -> memplan.Plan:
    """This process's plan; with several processes every one plans for the GPU with the least free
    memory, so all pick the same micro-batch. fsdp_gpus: plan one of that many FSDP processes
    (`loraflow plan --gpus`) instead of the processes this one was launched with. vocab_size: the
    vocabulary grown for tokens the template added, when larger than the config's."""
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    if free is not None:
        free = distributed.min_across_processes(free)
    processes = fsdp_gpus or distributed.world_size()
    shards = fsdp_gpus or (processes if distributed.fsdp_enabled() else 1)
    arch = memplan.Arch.from_config(config)
    arch = replace(arch, vocab=max(arch.vocab, vocab_size))
    return plan_for_params(params, arch, max_length, act_bytes=dtype.itemsize, fused=speed.fused,
                           gpu_free_bytes=free, processes=processes, shards=shards, trainable_tokens=trainable_tokens)


def write_plan(plan: memplan.Plan, md: Path = layout.MEMORY_PLAN_MD, as_json: Path = layout.MEMORY_PLAN_JSON,
               on_cpu: bool = False) -> None:
    """Log the plan as a table, write it to reports/, and stop when it does not fit."""
    table = memplan.render(plan, on_cpu=on_cpu)
    for line in table.splitlines():
        log.info("%s", line)
    write_text(md, "# Memory plan\n\n" + table + "\n")
    write_text(as_json, json.dumps(plan.to_dict(), indent=2))
    if not plan.chosen.fits:
        raise LoraflowError(f"the memory plan does not fit: {plan.chosen.peak_gib:.2f} GiB "
                            f"predicted at best, budget {plan.budget_bytes / memplan.GIB:.2f} GiB less "
                            f"{memplan.SAFETY_MARGIN:.0%}. Next rung down: {memplan.next_rung_down(plan)} "
                            f"(see {md})")


def out_of_memory(plan: memplan.Plan, error: BaseException) -> LoraflowError:
    """The error for a step that ran out of memory although the plan said it fits: the next rung down."""
    return LoraflowError(f"out of GPU memory although the plan predicted {plan.chosen.peak_gib:.2f} GiB "
                         f"({str(error).splitlines()[0]}). Next rung down: {memplan.next_rung_down(plan)}")
