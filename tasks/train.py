"""train stage: a LoRA or QLoRA adapter on our pre-tokenized rows and our labels.

    python -m tasks.train       (or: dvc repro train)

Read as a recipe: setup (the base, the plan, the adapter-wrapped model), train (resuming a checkpoint
of this very run), save (the adapter in PEFT's format, the loss curve, the summary). The pieces live in
loraflow.training and loraflow.planning; this module only orders them.

The transformers Trainer consumes input_ids and labels exactly as the tokenize stage wrote them,
so there is no second masking logic that could disagree with the mask audit. Checkpoints go to
models/checkpoints with a fingerprint of everything that shapes the run; a rerun with the same
fingerprint resumes from the last checkpoint, a rerun with another starts clean.

Imports neither prefect, dvc nor pandera: this stage also runs on minimal GPU machines.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from loraflow import distributed, fastpath, layout, memplan, training
from loraflow.artifacts import atomic_path, sha256_file, sha256_tree, write_text
from loraflow.errors import LoraflowError
from loraflow.modeling import LORA8_UNSHARDABLE, compute_dtype, device, load_config, resolve_base
from loraflow.params import TrainParams
from loraflow.planning import Speed, make_plan, resolve_speed, write_plan
from loraflow.stage import main
from loraflow.tracking import live_callback

log = logging.getLogger("loraflow.train")


def run(params: TrainParams) -> dict:
    """Train here, or with train.num_gpus above 1, in one process per GPU through accelerate FSDP."""
    gpus = distributed.resolve_num_gpus(params.num_gpus, torch.cuda.device_count())
    if gpus > 1 and distributed.world_size() == 1:
        if params.method == "lora8":
            raise LoraflowError(LORA8_UNSHARDABLE)
        refuse_sharded_token_rows(training.run_tokens(params, resolve_base(layout.BASE_DIR))[1])
        return launch_processes(params, gpus, fsdp=True)
    return train_here(params)


def refuse_sharded_token_rows(token_ids: list[int]) -> None:
    """FSDP1 as configured here (use_orig_params false) flattens a wrapped unit into one tensor, and
    PEFT's trainable-token rows sit in the root unit beside the frozen embedding: a mix FSDP1 refuses.
    Say so before launching, with what works instead."""
    if token_ids:
        raise LoraflowError(
            f"train.trainable_tokens ({len(token_ids)} token rows) cannot be sharded across GPUs yet (FSDP). "
            "Train on one GPU (train.num_gpus: 1), or set train.trainable_tokens: [] with "
            "train.modules_to_save: [lm_head] (the whole head, as a base needs its chat tokens learned)")


def launch_processes(params: TrainParams, processes: int, fsdp: bool) -> dict:
    """Relaunch this stage in `processes` processes with exactly these params: FSDP on GPUs, or plain
    data parallel (which runs on CPU too, over gloo: the tests use it). Returns the main process's
    summary."""
    params_file = layout.LAUNCH_DIR / "params.yaml"
    write_text(params_file, yaml.safe_dump({"train": params.model_dump()}, sort_keys=True))
    config = distributed.accelerate_config(processes, fsdp=fsdp)
    log.info("launching %d training processes (%s) through accelerate", processes, config["distributed_type"])
    distributed.launch(config, layout.LAUNCH_DIR / "accelerate_config.yaml", str(params_file))
    summary = json.loads(layout.stage_summary("train").read_text())
    summary.pop("stage", None)
    return {**summary, "launch_config": config}


@dataclass
class RunSetup:
    """What the setup step builds, for the train and save steps."""
    ref: object
    tokenizer: object
    train_rows: pd.DataFrame
    eval_rows: pd.DataFrame
    dtype: torch.dtype
    speed: Speed
    plan: memplan.Plan
    model: object
    adapter_keys: dict
    fingerprint: str
    resume: Path | None
    parameters: tuple[int, int]  # (trainable, total), counted once the adapter is in place
    parent: dict | None  # the adapter a warm start continued: its path and content hash


@dataclass
class Outcome:
    trainer: object
    result: object
    seconds: float
    eval_loss: float
    state: dict
    peaks: list


def train_here(params: TrainParams) -> dict:
    """The training itself: in this process, or in each process `accelerate launch` started (then
    the main one writes every output)."""
    if distributed.world_size() > 1:
        from accelerate import PartialState
        PartialState()  # joins the process group: the plan and the checkpoint setup below synchronize
    run = setup(params)
    outcome = train(params, run)
    if not distributed.is_main_process():
        return {}
    return save(params, run, outcome)


def setup(params: TrainParams) -> RunSetup:
    """The base, the memory plan (written before any weight loads, so a plan that cannot fit stops here),
    the adapter-wrapped model, and whether a checkpoint of this very run can be resumed."""
    ref = resolve_base(layout.BASE_DIR)
    train_rows, eval_rows = pd.read_parquet(layout.TRAIN_TOKENS), pd.read_parquet(layout.EVAL_TOKENS)
    dtype = compute_dtype(params.dtype)
    config = load_config(ref)
    speed = resolve_speed(params, config.model_type)
    tokenizer, token_ids = training.run_tokens(params, ref)
    if token_ids:
        log.info("training the embedding and output rows of %d tokens: %s", len(token_ids),
                 " ".join(tokenizer.convert_ids_to_tokens(token_ids)))
    longest = int(max(train_rows["input_ids"].map(len).max(), eval_rows["input_ids"].map(len).max()))
    plan = make_plan(params, config, longest, speed, dtype, trainable_tokens=len(token_ids), vocab_size=len(tokenizer))
    if distributed.is_main_process():
        write_plan(plan, on_cpu=not torch.cuda.is_available())
    elif not plan.chosen.fits:
        raise LoraflowError("the memory plan does not fit (the main process names the next rung down)")
    parent = training.parent_adapter(params.init_from)
    if parent is not None:
        log.info("warm start: continuing the adapter in %s", parent)
    model = training.build_peft_model(params, ref, dtype, plan.chosen.setup, speed, len(tokenizer), token_ids, parent)
    adapter_keys = training.adapter_key_map(model)  # before FSDP renames the modules
    parameters = parameter_counts(model)
    log.info("%s on %s (%s): %d trainable of %d parameters, %d train rows; packing %s, fused kernels %s",
             plan.chosen.setup.method, device(), dtype, *parameters, len(train_rows), speed.packing, speed.fused)
    # the parent hashed once: with a grown vocabulary its adapter holds the whole embedding and head
    parent_info = None if parent is None else {"path": str(parent), "sha256": sha256_tree(parent)}
    fingerprint = training.fingerprint(params, ref, parent_info and parent_info["sha256"])
    resume = training.prepare_checkpoints(layout.CHECKPOINTS_DIR, fingerprint)
    if resume:
        log.info("resuming from %s, the newest complete checkpoint", resume)
    return RunSetup(ref, tokenizer, train_rows, eval_rows, dtype, speed, plan, model, adapter_keys,
                 fingerprint, resume, parameters, parent_info)


def train(params: TrainParams, run: RunSetup) -> Outcome:
    """The Trainer's loop, then one eval loss and the gathered weights (every process takes part)."""
    trainer = training.make_trainer(params, run.model, run.plan, run.speed, training.TokenRows(run.train_rows),
                                    training.TokenRows(run.eval_rows), run.tokenizer.pad_token_id,
                                    layout.CHECKPOINTS_DIR, run.dtype,
                                    [c for c in (training.progress_callback(),
                                                 live_callback(layout.TRAIN_LIVE)) if c])
    t0 = time.perf_counter()
    result = training.train_or_name_next_rung(trainer, run.plan, run.resume)
    seconds = time.perf_counter() - t0
    eval_loss = trainer.evaluate()["eval_loss"]
    # under FSDP each process holds a shard: gather the full weights
    sharded = trainer.is_fsdp_enabled or distributed.world_size() > 1
    state = trainer.accelerator.get_state_dict(trainer.model) if sharded else run.model.state_dict()
    peaks = distributed.gather_from_processes(
        round(torch.cuda.max_memory_allocated() / memplan.GIB, 3) if torch.cuda.is_available() else None)
    return Outcome(trainer, result, seconds, eval_loss, state, peaks)


def save(params: TrainParams, run: RunSetup, outcome: Outcome) -> dict:
    """The adapter (atomically, in PEFT's format, with the tokenizer and what made it), the loss curve,
    and the stage summary."""
    chosen, planned = run.plan.chosen, run.plan.chosen.setup
    with atomic_path(layout.ADAPTER_DIR, is_dir=True) as tmp:
        training.save_adapter(run.model, {name: outcome.state[key] for name, key in run.adapter_keys.items()}, tmp)
        training.stable_adapter_config(tmp / "adapter_config.json")
        run.tokenizer.save_pretrained(tmp)
        write_text(tmp / "train_info.json", json.dumps({
            "base": run.ref.location, "base_revision": run.ref.revision, "method": planned.method,
            "fingerprint": run.fingerprint, "params": params.model_dump(), "init_from": run.parent,
            "train_rows": len(run.train_rows), "train_tokens_sha256": sha256_file(layout.TRAIN_TOKENS)}, indent=2))
    points = training.save_loss_curve(outcome.trainer.state.log_history)
    # Checkpoints serve only a run that was killed; a finished run's would make a forced rerun
    # "resume" past its last step (21 steps reported for max_steps 20)
    shutil.rmtree(layout.CHECKPOINTS_DIR, ignore_errors=True)
    trainable, total = run.parameters
    trained_tokens = int(run.train_rows["trained_tokens"].sum() * params.epochs) if params.max_steps < 0 else None
    peaks = outcome.peaks
    return {"method": planned.method, "device": str(device()), "dtype": str(run.dtype).replace("torch.", ""),
            "micro_batch": chosen.micro_batch, "checkpoint_layers": planned.checkpoint_layers,
            "packing": run.speed.packing, "fused_kernels": run.speed.fused,
            "processes": distributed.world_size(), "fsdp": bool(outcome.trainer.is_fsdp_enabled),
            "predicted_peak_gib": round(chosen.peak_gib, 3),
            "measured_peak_gib": max(peaks) if peaks[0] is not None else None,
            "measured_peak_gib_per_process": peaks,
            "trainable_parameters": trainable, "total_parameters": total,
            "steps": outcome.trainer.state.global_step, "resumed": run.resume is not None,
            "train_loss_first": points[0]["loss"] if points else None,
            "train_loss_last": points[-1]["loss"] if points else None,
            "train_loss_mean": round(outcome.result.training_loss, 4),
            "eval_loss": round(outcome.eval_loss, 4), "train_seconds": round(outcome.seconds, 2),
            "rows_per_second": round(outcome.result.metrics.get("train_samples_per_second", 0.0), 2),
            "trained_tokens": trained_tokens, "init_from": run.parent, **selection(params, outcome.trainer.state)}


def selection(params: TrainParams, state) -> dict:
    """Which step's adapter was kept, and whether early stopping ended the run."""
    if params.keep != "best":
        return {"kept": "last"}
    best = state.best_model_checkpoint
    return {"kept": "best", "best_step": training.checkpoint_step(Path(best)) if best else None,
            "best_eval_loss": round(state.best_metric, 4) if state.best_metric is not None else None,
            "stopped_early": state.global_step < state.max_steps}


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total), counting an input embedding kept in CPU memory, which the model no longer holds."""
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total + fastpath.params_kept_on_cpu(model)


if __name__ == "__main__":
    main("train", run)
