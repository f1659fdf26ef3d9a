"""train stage: a LoRA or QLoRA adapter on our pre-tokenized rows and our labels.

    python -m tasks.train       (or: dvc repro train)

The transformers Trainer consumes input_ids and labels exactly as the tokenize stage wrote them,
so there is no second masking logic that could disagree with the mask audit. Checkpoints go to
models/checkpoints with a fingerprint of everything that shapes the run; a rerun with the same
fingerprint resumes from the last checkpoint, a rerun with another starts clean. The adapter is
saved in PEFT format as safetensors, the loss curve as reports/train_loss.csv (a DVC plot) and PNG.

Imports neither prefect, dvc nor pandera: this stage also runs on minimal GPU machines.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from loraflow import distributed, fastpath, layout, memplan
from loraflow.artifacts import atomic_path, sha256_file, sha256_tree, write_text
from loraflow.errors import LoraflowError
from loraflow.faults import maybe_die
from loraflow.masking import IGNORE_INDEX
from loraflow.modeling import (LORA8_UNSHARDABLE, compute_dtype, device, device_map, load_config, load_model,
                               load_tokenizer, quantization_config, resolve_base)
from loraflow.params import TrainParams
from loraflow.plots import line_plot
from loraflow.stage import main

log = logging.getLogger("loraflow.train")
FINGERPRINT_FILE = "fingerprint.json"


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, df: pd.DataFrame):
        self.ids, self.labels = list(df["input_ids"]), list(df["labels"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": list(self.ids[i]), "labels": list(self.labels[i])}


def pad_collator(pad_id: int):
    """Right-pad a batch; padding is masked out of attention and of the loss."""
    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}
    return collate


def lora_config(params: TrainParams):
    from peft import LoraConfig
    return LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=params.target_modules, modules_to_save=params.modules_to_save or None,
                      task_type="CAUSAL_LM", bias="none")


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
              fsdp_gpus: int | None = None) -> memplan.Plan:
    """This process's plan; with several processes every one plans for the GPU with the least free
    memory, so all pick the same micro-batch. fsdp_gpus: plan one of that many FSDP processes
    (`loraflow plan --gpus`) instead of the processes this one was launched with."""
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    if free is not None:
        free = distributed.min_across_processes(free)
    processes = fsdp_gpus or distributed.world_size()
    shards = fsdp_gpus or (processes if distributed.fsdp_enabled() else 1)
    return memplan.plan_for_params(params, memplan.Arch.from_config(config), max_length,
                                   act_bytes=dtype.itemsize, fused=speed.fused, gpu_free_bytes=free,
                                   processes=processes, shards=shards)


def write_plan(plan: memplan.Plan, md: Path = layout.MEMORY_PLAN_MD, as_json: Path = layout.MEMORY_PLAN_JSON) -> None:
    """Log the plan as a table, write it to reports/, and stop when it does not fit."""
    table = memplan.render(plan)
    for line in table.splitlines():
        log.info("%s", line)
    write_text(md, "# Memory plan\n\n" + table + "\n")
    write_text(as_json, json.dumps(plan.to_dict(), indent=2))
    if not plan.chosen.fits:
        raise LoraflowError(f"the memory plan does not fit: {plan.chosen.parts['peak'] / memplan.GIB:.2f} GiB "
                            f"predicted at best, budget {plan.budget_bytes / memplan.GIB:.2f} GiB less "
                            f"{memplan.SAFETY_MARGIN:.0%}. Next rung down: {memplan.next_rung_down(plan)} "
                            f"(see {md})")


def build_peft_model(params: TrainParams, ref, dtype: torch.dtype, setup: memplan.Setup, speed: Speed):
    """The base (quantized as the plan's method says) with fused kernels, packed attention and the
    plan's checkpointing, wrapped with a fresh LoRA adapter."""
    from peft import get_peft_model
    torch.manual_seed(params.seed)  # LoRA A matrices are drawn at wrap time
    quant = quantization_config(setup.method, dtype, sharded=distributed.fsdp_enabled())
    attn = fastpath.register_packed_attention() if speed.packing else None
    model = load_model(ref, dtype, quantization_config=quant, attn_implementation=attn,
                       device_map=device_map())
    model.config.use_cache = False
    if speed.fused:
        fastpath.apply_fused_kernels(model, layers=setup.fused_layers)
    # No prepare_model_for_kbit_training: it upcasts the embedding, the output head and every norm
    # to fp32 (about 2 GiB at 8B), which training a LoRA adapter does not need.
    model = get_peft_model(model, lora_config(params))
    if dtype != torch.float32:
        fastpath.keep_adapter_inputs_in_compute_dtype(model)
    if speed.fused and setup.method == "qlora" and not distributed.fsdp_enabled():
        log.info("fused QLoRA projections: %d", fastpath.fuse_qlora_projections(model))
    if setup.embedding_on_cpu:
        freed = fastpath.keep_input_embedding_on_cpu(model)
        log.info("input embedding kept in CPU memory: %.2f GiB of GPU memory freed", freed / memplan.GIB)
    fastpath.checkpoint_layers(model, setup.checkpoint_layers)
    return model


def fingerprint(params: TrainParams, ref) -> str:
    """Everything that shapes the run: a checkpoint from another fingerprint must not be resumed."""
    h = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode())
    h.update(str(distributed.world_size()).encode())  # a checkpoint of another process count is not resumed
    h.update(sha256_file(layout.TRAIN_TOKENS).encode())
    h.update(json.dumps([ref.location, ref.revision]).encode())
    if Path(ref.location).is_dir():
        h.update(sha256_tree(ref.location).encode())
    return h.hexdigest()


def resumable(ckpt_dir: Path, fp: str) -> bool:
    """True when ckpt_dir holds a checkpoint of this very run."""
    marker = ckpt_dir / FINGERPRINT_FILE
    same = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp
    return same and any(ckpt_dir.glob("checkpoint-*"))


def prepare_checkpoints(ckpt_dir: Path, fp: str) -> bool:
    """True when ckpt_dir holds a checkpoint of this very run to resume from; else starts it clean.
    Only the main process writes; the others wait for it and then read the same answer."""
    if distributed.is_main_process() and not resumable(ckpt_dir, fp):
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
        (ckpt_dir / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp}))
    distributed.barrier()
    return resumable(ckpt_dir, fp)


def progress_callback():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            maybe_die(f"save:{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.info("step %d/%d loss %.4f lr %.2e", state.global_step, state.max_steps, logs["loss"],
                         logs.get("learning_rate", 0.0))
    return Progress()


def training_args(params: TrainParams, out_dir: Path, dtype: torch.dtype, plan: memplan.Plan):
    from transformers import TrainingArguments
    on_gpu = torch.cuda.is_available()
    micro = plan.chosen.micro_batch
    optim = {"adamw": "adamw_torch_fused" if on_gpu else "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}[params.optimizer]
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        # the optimizer step still sees batch_size * grad_accum rows; the Trainer normalizes the loss
        # by the trained tokens of the whole step, so micro-batching leaves the math unchanged
        gradient_accumulation_steps=plan.rows_per_step // micro,
        num_train_epochs=params.epochs, max_steps=params.max_steps, learning_rate=params.lr,
        warmup_steps=params.warmup_ratio, lr_scheduler_type="linear", weight_decay=params.weight_decay,
        logging_steps=params.logging_steps, save_strategy="steps", save_steps=params.save_steps,
        save_total_limit=1, seed=params.seed, data_seed=params.seed, report_to="none", disable_tqdm=True,
        bf16=on_gpu and dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16, use_cpu=not on_gpu,
        remove_unused_columns=False, dataloader_num_workers=0, optim=optim,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
        # gradient checkpointing is set on the model itself, per layer, by the plan
        gradient_checkpointing=False,
    )


def make_trainer(params: TrainParams, model, plan: memplan.Plan, speed: Speed, train_ds, eval_ds, pad_id: int,
                 out_dir: Path, dtype: torch.dtype, callbacks=()):
    from transformers import Trainer
    collator = fastpath.packed_collator(pad_id) if speed.packing else pad_collator(pad_id)
    trainer = Trainer(model=model, args=training_args(params, out_dir, dtype, plan), train_dataset=train_ds,
                      eval_dataset=eval_ds, data_collator=collator, callbacks=list(callbacks))
    if trainer.is_fsdp_enabled:
        # FSDP1 without use_orig_params flattens each wrapped unit into one tensor: PEFT's policy gives
        # the trainable LoRA weights units of their own, apart from the frozen base weights
        from peft.utils.other import fsdp_auto_wrap_policy
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    return trainer


def train_or_name_next_rung(trainer, plan: memplan.Plan, resume: bool):
    try:
        return trainer.train(resume_from_checkpoint=True if resume else None)
    except torch.OutOfMemoryError as e:
        raise LoraflowError(f"out of GPU memory although the plan predicted "
                            f"{plan.chosen.parts['peak'] / memplan.GIB:.2f} GiB ({str(e).splitlines()[0]}). "
                            f"Next rung down: {memplan.next_rung_down(plan)}") from None


def adapter_key_map(model) -> dict[str, str]:
    """For each tensor PEFT saves in an adapter, the model state-dict key it comes from. Read before
    training: FSDP1 renames the modules it wraps, and PEFT finds the adapter's keys by module name, so
    after wrapping it finds none (peft 0.21). The gathered FSDP state dict keeps the plain names."""
    from peft import get_peft_model_state_dict
    keys = list(model.state_dict().keys())
    markers = {k: torch.tensor(i) for i, k in enumerate(keys)}  # PEFT selects by key; the values mark the source
    return {name: keys[int(t)] for name, t in get_peft_model_state_dict(model, state_dict=markers).items()}


def save_adapter(model, tensors: dict, out_dir: Path) -> None:
    """The adapter in PEFT's own format: adapter_model.safetensors and adapter_config.json."""
    import copy

    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(out_dir))


def stable_adapter_config(path: Path) -> None:
    """PEFT writes the resolved target modules from a set, in hash-seed order: sort them, so the same
    run gives the same bytes and DVC does not see a change where there is none."""
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_loss_curve(history: list[dict]) -> list[dict]:
    points = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")} for h in history if "loss" in h]
    with atomic_path(layout.LOSS_CSV) as tmp:
        pd.DataFrame(points, columns=["step", "loss", "lr"]).to_csv(tmp, index=False)
    line_plot(layout.LOSS_PNG, [p["step"] for p in points], [p["loss"] for p in points],
              title="training loss", xlabel="optimizer step", ylabel="loss (trained tokens)")
    return points


def run(params: TrainParams) -> dict:
    """Train here, or with train.num_gpus above 1, in one process per GPU through accelerate FSDP."""
    gpus = distributed.resolve_num_gpus(params.num_gpus, torch.cuda.device_count())
    if gpus > 1 and distributed.world_size() == 1:
        if params.method == "lora8":
            raise LoraflowError(LORA8_UNSHARDABLE)
        return launch_processes(params, gpus, fsdp=True)
    return train_here(params)


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


def train_here(params: TrainParams) -> dict:
    """The training itself: in this process, or in each process `accelerate launch` started (then
    the main one writes every output)."""
    if distributed.world_size() > 1:
        from accelerate import PartialState
        PartialState()  # joins the process group: the plan and the checkpoint setup below synchronize
    main_process = distributed.is_main_process()
    ref = resolve_base(layout.BASE_DIR)
    tokenizer = load_tokenizer(ref)
    train_df, eval_df = pd.read_parquet(layout.TRAIN_TOKENS), pd.read_parquet(layout.EVAL_TOKENS)
    dtype = compute_dtype(params.dtype)
    config = load_config(ref)
    speed = resolve_speed(params, config.model_type)
    longest = int(max(train_df["input_ids"].map(len).max(), eval_df["input_ids"].map(len).max()))
    plan = make_plan(params, config, longest, speed, dtype)
    if main_process:
        write_plan(plan)
    elif not plan.chosen.fits:
        raise LoraflowError("the memory plan does not fit (the main process names the next rung down)")
    setup = plan.chosen.setup
    model = build_peft_model(params, ref, dtype, setup, speed)
    adapter_keys = adapter_key_map(model)  # before FSDP renames the modules
    trainable, total = model.get_nb_trainable_parameters()
    total += fastpath.params_kept_on_cpu(model)
    log.info("%s on %s (%s): %d trainable of %d parameters, %d train rows; packing %s, fused kernels %s",
             setup.method, device(), dtype, trainable, total, len(train_df), speed.packing, speed.fused)

    fp = fingerprint(params, ref)
    resume = prepare_checkpoints(layout.CHECKPOINTS_DIR, fp)
    if resume:
        log.info("resuming from the last checkpoint in %s", layout.CHECKPOINTS_DIR)
    trainer = make_trainer(params, model, plan, speed, TokenRows(train_df), TokenRows(eval_df),
                           tokenizer.pad_token_id, layout.CHECKPOINTS_DIR, dtype, [progress_callback()])
    t0 = time.perf_counter()
    result = train_or_name_next_rung(trainer, plan, resume)
    seconds = time.perf_counter() - t0
    eval_loss = trainer.evaluate()["eval_loss"]
    # under FSDP each process holds a shard: gather the full weights (every process takes part)
    sharded = trainer.is_fsdp_enabled or distributed.world_size() > 1
    state = trainer.accelerator.get_state_dict(trainer.model) if sharded else model.state_dict()
    peaks = distributed.gather_from_processes(
        round(torch.cuda.max_memory_allocated() / memplan.GIB, 3) if torch.cuda.is_available() else None)
    if not main_process:
        return {}

    with atomic_path(layout.ADAPTER_DIR, is_dir=True) as tmp:
        save_adapter(model, {name: state[key] for name, key in adapter_keys.items()}, tmp)
        stable_adapter_config(tmp / "adapter_config.json")
        tokenizer.save_pretrained(tmp)
        write_text(tmp / "train_info.json", json.dumps({
            "base": ref.location, "base_revision": ref.revision, "method": setup.method,
            "fingerprint": fp, "params": params.model_dump()}, indent=2))
    points = save_loss_curve(trainer.state.log_history)
    trained_tokens = int(train_df["trained_tokens"].sum() * params.epochs) if params.max_steps < 0 else None
    return {"method": setup.method, "device": str(device()), "dtype": str(dtype).replace("torch.", ""),
            "micro_batch": plan.chosen.micro_batch, "checkpoint_layers": setup.checkpoint_layers,
            "packing": speed.packing, "fused_kernels": speed.fused,
            "processes": distributed.world_size(), "fsdp": bool(trainer.is_fsdp_enabled),
            "predicted_peak_gib": round(plan.chosen.parts["peak"] / memplan.GIB, 3),
            "measured_peak_gib": max(peaks) if peaks[0] is not None else None,
            "measured_peak_gib_per_process": peaks,
            "trainable_parameters": trainable, "total_parameters": total, "steps": trainer.state.global_step,
            "resumed": resume, "train_loss_first": points[0]["loss"] if points else None,
            "train_loss_last": points[-1]["loss"] if points else None, "train_loss_mean": round(result.training_loss, 4),
            "eval_loss": round(eval_loss, 4), "train_seconds": round(seconds, 2),
            "rows_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 2),
            "trained_tokens": trained_tokens}


if __name__ == "__main__":
    main("train", run)
