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
import json
import logging
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from loraflow import layout
from loraflow.artifacts import atomic_path, sha256_file, sha256_tree, write_text
from loraflow.errors import LoraflowError
from loraflow.faults import maybe_die
from loraflow.masking import IGNORE_INDEX
from loraflow.modeling import compute_dtype, device, load_model, load_tokenizer, resolve_base
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


def quantization_config(params: TrainParams, dtype: torch.dtype):
    if params.method != "qlora":
        return None
    if not torch.cuda.is_available():
        raise LoraflowError("train.method=qlora needs a CUDA GPU (bitsandbytes 4-bit kernels). "
                            "On CPU use train.method: lora.")
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def lora_config(params: TrainParams):
    from peft import LoraConfig
    return LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=params.target_modules, modules_to_save=params.modules_to_save or None,
                      task_type="CAUSAL_LM", bias="none")


def build_peft_model(params: TrainParams, ref, dtype: torch.dtype):
    from peft import get_peft_model, prepare_model_for_kbit_training
    torch.manual_seed(params.seed)  # LoRA A matrices are drawn at wrap time
    quant = quantization_config(params, dtype)
    model = load_model(ref, dtype, quantization_config=quant,
                       device_map={"": device().index or 0} if quant is not None else None)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(params))


def fingerprint(params: TrainParams, ref) -> str:
    """Everything that shapes the run: a checkpoint from another fingerprint must not be resumed."""
    h = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode())
    h.update(sha256_file(layout.TRAIN_TOKENS).encode())
    h.update(json.dumps([ref.location, ref.revision]).encode())
    if Path(ref.location).is_dir():
        h.update(sha256_tree(ref.location).encode())
    return h.hexdigest()


def prepare_checkpoints(ckpt_dir: Path, fp: str) -> bool:
    """True when ckpt_dir holds a checkpoint of this very run to resume from."""
    marker = ckpt_dir / FINGERPRINT_FILE
    same = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp
    if same and any(ckpt_dir.glob("checkpoint-*")):
        return True
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": fp}))
    return False


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


def training_args(params: TrainParams, out_dir: Path, dtype: torch.dtype):
    from transformers import TrainingArguments
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size, gradient_accumulation_steps=params.grad_accum,
        num_train_epochs=params.epochs, max_steps=params.max_steps, learning_rate=params.lr,
        warmup_steps=params.warmup_ratio, lr_scheduler_type="linear", weight_decay=params.weight_decay,
        logging_steps=params.logging_steps, save_strategy="steps", save_steps=params.save_steps,
        save_total_limit=1, seed=params.seed, data_seed=params.seed, report_to="none", disable_tqdm=True,
        bf16=on_gpu and dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16, use_cpu=not on_gpu,
        remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch",
        # gradient checkpointing is set on the model itself (non-reentrant), not by the Trainer
        gradient_checkpointing=False,
    )


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
    from transformers import Trainer

    ref = resolve_base(layout.BASE_DIR)
    tokenizer = load_tokenizer(ref)
    train_df, eval_df = pd.read_parquet(layout.TRAIN_TOKENS), pd.read_parquet(layout.EVAL_TOKENS)
    dtype = compute_dtype(params.dtype)
    model = build_peft_model(params, ref, dtype)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s on %s (%s): %d trainable of %d parameters, %d train rows", params.method, device(), dtype,
             trainable, total, len(train_df))

    fp = fingerprint(params, ref)
    resume = prepare_checkpoints(layout.CHECKPOINTS_DIR, fp)
    if resume:
        log.info("resuming from the last checkpoint in %s", layout.CHECKPOINTS_DIR)
    trainer = Trainer(model=model, args=training_args(params, layout.CHECKPOINTS_DIR, dtype),
                      train_dataset=TokenRows(train_df), eval_dataset=TokenRows(eval_df),
                      data_collator=pad_collator(tokenizer.pad_token_id), callbacks=[progress_callback()])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - t0
    eval_loss = trainer.evaluate()["eval_loss"]

    with atomic_path(layout.ADAPTER_DIR, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        stable_adapter_config(tmp / "adapter_config.json")
        tokenizer.save_pretrained(tmp)
        write_text(tmp / "train_info.json", json.dumps({
            "base": ref.location, "base_revision": ref.revision, "method": params.method,
            "fingerprint": fp, "params": params.model_dump()}, indent=2))
    points = save_loss_curve(trainer.state.log_history)
    trained_tokens = int(train_df["trained_tokens"].sum() * params.epochs) if params.max_steps < 0 else None
    return {"method": params.method, "device": str(device()), "dtype": str(dtype).replace("torch.", ""),
            "trainable_parameters": trainable, "total_parameters": total, "steps": trainer.state.global_step,
            "resumed": resume, "train_loss_first": points[0]["loss"] if points else None,
            "train_loss_last": points[-1]["loss"] if points else None, "train_loss_mean": round(result.training_loss, 4),
            "eval_loss": round(eval_loss, 4), "train_seconds": round(seconds, 2),
            "rows_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 2),
            "trained_tokens": trained_tokens}


if __name__ == "__main__":
    main("train", run)
