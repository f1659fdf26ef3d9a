"""Multi-GPU training through accelerate and FSDP (train.num_gpus).

With more than one GPU the train stage does not train in its own process: it writes an accelerate
config and relaunches itself (`accelerate launch --module tasks.train`), one process per GPU. In
those processes accelerate wraps the model in FSDP (FULL_SHARD: weights, LoRA weights, gradients and
optimizer state are split across the GPUs, one decoder layer gathered at a time). The FSDP settings
follow PEFT's own recipe for LoRA and QLoRA (docs/source/accelerate/fsdp.md in peft):
- FSDP1 with use_orig_params false, and PEFT's wrap policy, so trainable LoRA weights and frozen base
  weights are never flattened together;
- weights loaded once on rank 0 and broadcast (cpu_ram_efficient_loading, sync_module_states);
- QLoRA stores its 4-bit weights in the compute dtype (bnb_4bit_quant_storage, see
  modeling.quantization_config), because FSDP shards only floating-point tensors.
Rank 0 writes every output; the stage still writes one PEFT adapter.

accelerate has no FSDP on CPU, so the tests run the same launcher with plain data parallel over gloo
on CPU, end to end, and check the FSDP config by loading it with accelerate's own reader.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from loraflow.artifacts import write_text
from loraflow.errors import LoraflowError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def fsdp_enabled() -> bool:
    """True inside a process that `accelerate launch` started with FSDP, on a GPU (accelerate applies
    FSDP only there)."""
    import torch
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and torch.cuda.is_available()


def resolve_num_gpus(setting: int | str, available: int) -> int:
    """train.num_gpus as a count: auto takes every visible GPU (at least 1, for CPU runs)."""
    if setting == "auto":
        return max(available, 1)
    if setting > max(available, 1):
        raise LoraflowError(f"train.num_gpus is {setting} but this machine has {available} CUDA GPU(s). "
                            "Set train.num_gpus to at most that, or auto.")
    return int(setting)


def accelerate_config(num_processes: int, fsdp: bool = True) -> dict:
    """The accelerate config for num_processes processes on one machine, all started by the same
    torchrun launcher: FSDP (GPUs), or with fsdp=False plain data parallel. On a machine without GPUs
    the Trainer runs each process on CPU, and accelerate then joins them over gloo (its own
    MULTI_CPU launch needs MPI)."""
    config = {"compute_environment": "LOCAL_MACHINE", "debug": False, "machine_rank": 0, "num_machines": 1,
              "num_processes": num_processes, "rdzv_backend": "static", "same_network": True, "use_cpu": False,
              "main_training_function": "main", "downcast_bf16": "no",
              # the Trainer sets the precision from train.dtype (TrainingArguments bf16/fp16)
              "mixed_precision": "no"}
    if not fsdp:
        return {**config, "distributed_type": "MULTI_GPU"}
    return {**config, "distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 1,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",   # one unit per decoder layer (_no_split_modules)
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_use_orig_params": False,                       # needs PEFT's wrap policy (train stage sets it)
        "fsdp_cpu_ram_efficient_loading": True,              # rank 0 reads the weights, the others get them
        "fsdp_sync_module_states": True,
        "fsdp_offload_params": False,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",        # checkpoints; the adapter is gathered in full
        "fsdp_activation_checkpointing": False,              # per-layer checkpointing comes from the memory plan
    }}


def launch(config: dict, config_path: Path, params_file: str) -> None:
    """Write config to config_path and run the train stage under `accelerate launch` with it; raise
    with the exit code when a process fails (their logs go to this process's stderr)."""
    write_text(config_path, yaml.safe_dump(config, sort_keys=True))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
           "--module", "tasks.train", "--params", params_file]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise LoraflowError(f"distributed training failed (exit code {done.returncode}) in "
                            f"{config['num_processes']} processes; the processes' errors are above. "
                            f"Launch config: {config_path}")


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def min_across_processes(value: float) -> float:
    """The smallest value over all processes (the GPU with the least free memory sets the plan)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def gather_from_processes(value) -> list:
    """value from every process, in rank order ([value] alone)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
