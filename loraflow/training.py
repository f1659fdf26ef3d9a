"""The pieces of a training run, in the order the train stage uses them: the rows and their collator,
the base wrapped with a LoRA adapter as the plan says, the checkpoints a rerun may resume, the
Trainer, and the adapter saved in PEFT's format with its loss curve.

Imports neither prefect, dvc nor pandera: training also runs on minimal GPU machines.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import torch

from loraflow import distributed, fastpath, fused_lora, layout, memplan
from loraflow.artifacts import atomic_path, sha256_file, sha256_tree
from loraflow.chat_format import ChatFormat, run_tokenizer
from loraflow.errors import LoraflowError
from loraflow.faults import maybe_die
from loraflow.masking import IGNORE_INDEX
from loraflow.modeling import device_map, fit_vocab, load_model, quantization_config
from loraflow.params import TrainParams
from loraflow.planning import Speed, out_of_memory
from loraflow.plots import line_plot

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


def trainable_token_ids(setting, untrained_tokens: list[str], tokenizer) -> list[int]:
    """train.trainable_tokens as token ids: auto is the chat format's untrained tokens (the template's
    tokens a base checkpoint never learned, and any the template stage added)."""
    tokens = untrained_tokens if setting == "auto" else setting
    vocab = tokenizer.get_vocab()
    unknown = [t for t in tokens if t not in vocab]
    if unknown:
        raise LoraflowError(f"train.trainable_tokens: {unknown} are not single tokens of this tokenizer; name "
                            "tokens it has, or add them through template.add_tokens")
    return sorted({vocab[t] for t in tokens})


def run_tokens(params: TrainParams, ref):
    """The run's tokenizer (with the tokens the template stage added) and the ids whose rows train."""
    chat = ChatFormat.read(layout.CHAT_FORMAT)
    tokenizer = run_tokenizer(ref, chat)
    return tokenizer, trainable_token_ids(params.trainable_tokens, chat.untrained_tokens, tokenizer)


def token_indices_by_module(model, ids: list[int]) -> dict[str, list[int]] | None:
    """PEFT's trainable_token_indices: the ids' rows of the input embedding and of an untied output
    head (a tied head follows the embedding: PEFT ties the two)."""
    if not ids:
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    indices = {names[id(embedding)]: list(ids)}
    if head is not None and head.weight is not embedding.weight:
        indices[names[id(head)]] = list(ids)
    return indices


def lora_config(params: TrainParams, token_indices: dict[str, list[int]] | None = None):
    from peft import LoraConfig
    return LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=params.target_modules, modules_to_save=params.modules_to_save or None,
                      trainable_token_indices=token_indices, task_type="CAUSAL_LM", bias="none")


def parent_adapter(setting: str) -> Path | None:
    """train.init_from as the adapter directory to continue, or None for a fresh adapter."""
    if setting == "base":
        return None
    if setting == "promoted":
        promoted = layout.PROMOTED_DIR / "adapter"
        if not (promoted / "adapter_config.json").is_file():
            log.info("train.init_from: promoted, but nothing is promoted yet: a fresh adapter")
            return None
        return promoted
    path = Path(setting)
    if not (path / "adapter_config.json").is_file():
        raise LoraflowError(f"train.init_from: {setting} is not a PEFT adapter directory (no adapter_config.json); "
                            "use base, promoted, or such a directory")
    return path


def check_parent(parent: Path, config) -> None:
    """A warm start continues the parent's weights, so its adapter must have this run's shape."""
    saved = json.loads((parent / "adapter_config.json").read_text())
    wanted = {"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
              "trainable_token_indices": config.trainable_token_indices,
              "modules_to_save": sorted(config.modules_to_save or []) or None}
    if config.target_modules != "all-linear":
        wanted["target_modules"] = sorted(config.target_modules)
    have = {**saved, "modules_to_save": sorted(saved.get("modules_to_save") or []) or None,
            "target_modules": sorted(saved.get("target_modules") or [])}
    differ = [f"{k}: parent {have.get(k)!r}, this run {v!r}" for k, v in wanted.items() if have.get(k, v) != v]
    if differ:
        raise LoraflowError(f"train.init_from: the adapter in {parent} cannot be continued with these params ("
                            + "; ".join(differ) + "). Set the train params to the parent's, or train.init_from: base")


def build_peft_model(params: TrainParams, ref, dtype: torch.dtype, setup: memplan.Setup, speed: Speed,
                     vocab_size: int = 0, token_ids: list[int] = (), parent: Path | None = None):
    """The base (quantized as the plan's method says) with fused kernels, packed attention and the
    plan's checkpointing, its vocabulary grown to vocab_size for tokens the template added, wrapped with
    a fresh LoRA adapter that also trains the token_ids' embedding and output rows, or with the parent
    adapter's weights to continue (a warm start)."""
    from peft import get_peft_model
    torch.manual_seed(params.seed)  # LoRA A matrices are drawn at wrap time
    quant = quantization_config(setup.method, dtype, sharded=distributed.fsdp_enabled())
    attn = fastpath.register_packed_attention() if speed.packing else None
    model = load_model(ref, dtype, quantization_config=quant, attn_implementation=attn,
                       device_map=device_map())
    if fit_vocab(model, vocab_size):
        log.info("vocabulary grown to %d rows for the tokens the template added", vocab_size)
    model.config.use_cache = False
    if speed.fused:
        fastpath.apply_fused_kernels(model, layers=setup.fused_layers)
    # No prepare_model_for_kbit_training: it upcasts the embedding, the output head and every norm
    # to fp32 (about 2 GiB at 8B), which training a LoRA adapter does not need.
    try:
        config = lora_config(params, token_indices_by_module(model, list(token_ids)))
        if parent is None:
            model = get_peft_model(model, config)
        else:
            from peft import PeftModel
            check_parent(parent, config)
            model = PeftModel.from_pretrained(model, parent, is_trainable=True)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LoraflowError(f"train.target_modules: {e}. This model's linear layers: {', '.join(linear)}") from None
    if dtype != torch.float32:
        fastpath.keep_adapter_inputs_in_compute_dtype(model)
    if speed.fused and not distributed.fsdp_enabled():  # FSDP gathers weights per module: peft's path
        log.info("fused LoRA projections: %d", fused_lora.fuse_lora_projections(model))
    if setup.embedding_on_cpu:
        freed = fastpath.keep_input_embedding_on_cpu(model)
        log.info("input embedding kept in CPU memory: %.2f GiB of GPU memory freed", freed / memplan.GIB)
    fastpath.checkpoint_layers(model, setup.checkpoint_layers, offload=setup.offload_checkpoints,
                               stashed_outputs=setup.stashed_outputs)
    return model


def fingerprint(params: TrainParams, ref, parent_sha256: str | None = None) -> str:
    """Everything that shapes the run: a checkpoint from another fingerprint must not be resumed.
    parent_sha256: the content hash of the adapter a warm start continues."""
    h = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode())
    if parent_sha256 is not None:
        h.update(parent_sha256.encode())  # a warm start from another parent is another run
    h.update(str(distributed.world_size()).encode())  # a checkpoint of another process count is not resumed
    h.update(sha256_file(layout.TRAIN_TOKENS).encode())
    h.update(json.dumps([ref.location, ref.revision]).encode())
    if Path(ref.location).is_dir():
        h.update(sha256_tree(ref.location).encode())
    return h.hexdigest()


def complete_checkpoint(path: Path) -> bool:
    """A checkpoint the Trainer finished writing: its trainer_state.json (written last) parses, and the
    adapter weights and the optimizer state are there. A kill or a full disk mid-save leaves one that
    is not, which resuming must skip, not fail on."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = any(path.glob("adapter_model.safetensors")) or any(path.glob("pytorch_model_fsdp*"))
    optimizer = (path / "optimizer.pt").is_file() or any(path.glob("optimizer_*"))
    return weights and optimizer


def checkpoint_step(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def resumable(ckpt_dir: Path, fp: str) -> Path | None:
    """The newest complete checkpoint of this very run in ckpt_dir, if any."""
    marker = ckpt_dir / FINGERPRINT_FILE
    try:
        same = json.loads(marker.read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        same = False
    if not same:
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and complete_checkpoint(p)]
    return max(done, key=checkpoint_step) if done else None


def prepare_checkpoints(ckpt_dir: Path, fp: str) -> Path | None:
    """The checkpoint of this very run to resume from (the newest complete one), or None, having
    started ckpt_dir clean. Incomplete checkpoints are deleted, so the Trainer's own rotation never
    counts them. Only the main process writes; the others wait for it and read the same answer."""
    if distributed.is_main_process():
        resume = resumable(ckpt_dir, fp)
        if resume is None:
            if ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)
            ckpt_dir.mkdir(parents=True)
            (ckpt_dir / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp}))
        for partial in ckpt_dir.glob("checkpoint-*"):
            if partial.is_dir() and not complete_checkpoint(partial):
                log.warning("ignoring an incomplete checkpoint (a kill or a full disk mid-save): %s", partial)
                shutil.rmtree(partial)
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
            if logs and "eval_loss" in logs:
                log.info("step %d/%d eval loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])
    return Progress()


def training_args(params: TrainParams, out_dir: Path, dtype: torch.dtype, plan: memplan.Plan):
    from transformers import TrainingArguments
    on_gpu = torch.cuda.is_available()
    micro = plan.chosen.micro_batch
    # fused on CPU too: the single-tensor AdamW's square roots come from MKL's vector math, whose last bit
    # depends on the processor; the fused kernel's are correctly rounded (README, "Determinism")
    optim = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit"}[params.optimizer]
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        # the optimizer step still sees rows_per_step rows; the Trainer normalizes the loss
        # by the trained tokens of the whole step, so micro-batching leaves the math unchanged
        gradient_accumulation_steps=plan.rows_per_step // micro,
        num_train_epochs=params.epochs, max_steps=params.max_steps, learning_rate=params.lr,
        # a ratio passed as warmup_steps: transformers reads a float below 1 there as a share of the
        # steps (transformers 5 has no warmup_ratio argument), and warmup_ratio is checked to be below 1
        warmup_steps=params.warmup_ratio, lr_scheduler_type="linear", weight_decay=params.weight_decay,
        # the first step is logged too, so a run shorter than logging_steps still has a loss curve (and
        # DVCLive's plot files, which dvc.yaml declares as outputs)
        logging_steps=params.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=params.save_steps,
        # with keep: best the Trainer keeps the best checkpoint besides the newest
        save_total_limit=1, seed=params.seed, data_seed=params.seed, report_to=params.report_to or "none",
        eval_strategy="steps" if params.eval_steps else "no", eval_steps=params.eval_steps,
        load_best_model_at_end=params.keep == "best", metric_for_best_model="eval_loss", greater_is_better=False,
        include_num_input_tokens_seen=True, disable_tqdm=True,
        # a NaN or infinite loss is logged as it is, not replaced by the running mean; and checking each
        # micro-batch's loss on the host (.item()) would make the host wait for the GPU every micro-batch
        logging_nan_inf_filter=False,
        bf16=on_gpu and dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16, use_cpu=not on_gpu,
        remove_unused_columns=False, dataloader_num_workers=0, optim=optim,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
        # checkpointing is set on the model itself, per layer, by the plan (the argument's name changed
        # in transformers 5.2x, the old one warns there)
        **{checkpointing_argument(): False},
    )


def checkpointing_argument() -> str:
    import inspect
    from transformers import TrainingArguments
    names = inspect.signature(TrainingArguments).parameters
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def make_trainer(params: TrainParams, model, plan: memplan.Plan, speed: Speed, train_ds, eval_ds, pad_id: int,
                 out_dir: Path, dtype: torch.dtype, callbacks=()):
    from transformers import EarlyStoppingCallback, Trainer
    callbacks = list(callbacks)
    if params.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience))
    collator = fastpath.packed_collator(pad_id, trained_logits_only=fastpath.takes_kept_logits(model)) \
        if speed.packing else pad_collator(pad_id)
    args = training_args(params, out_dir, dtype, plan)
    optimizer = None
    if params.optimizer == "adamw_8bit":
        from loraflow import flat_adamw8bit  # imports bitsandbytes, which only this optimizer needs
        optimizer = flat_adamw8bit.trainer_optimizer(args, model)
    trainer = host_counting(Trainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                     data_collator=collator, callbacks=callbacks,
                                     optimizer_cls_and_kwargs=optimizer)
    # without tqdm the Trainer prints every log dict; the Progress callback already logs each step once
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)
    if trainer.is_fsdp_enabled:
        # FSDP1 without use_orig_params flattens each wrapped unit into one tensor: PEFT's policy gives
        # the trainable LoRA weights units of their own, apart from the frozen base weights
        from peft.utils.other import fsdp_auto_wrap_policy
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    return trainer


def host_counting(trainer_class):
    """The Trainer, with its per-micro-batch bookkeeping done on the host from the batch's shape.
    - Tokens seen (one-process runs): its own count puts the number on the GPU and reads it back
      (.item()), which makes the host wait there for the GPU to finish the micro-batch; the GPU then
      idles while the host prepares and launches the next one. Same count: every token of the batch.
    - FLOPs: its own walks every parameter of the model (num_parameters) each micro-batch, milliseconds
      of Python at 8B with LoRA; the count is linear in the batch's tokens, so its factor is kept."""
    class HostCountingTrainer(trainer_class):
        _flops_per_token = None

        def _track_num_input_tokens(self, inputs):
            if self.args.world_size > 1 or self.args.include_num_input_tokens_seen not in (True, "all") \
                    or "input_ids" not in inputs:
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += inputs["input_ids"].numel()

        def floating_point_ops(self, inputs):
            tokens = inputs["input_ids"].numel() if isinstance(inputs.get("input_ids"), torch.Tensor) else 0
            if not tokens:
                return super().floating_point_ops(inputs)
            if self._flops_per_token is None:
                self._flops_per_token = super().floating_point_ops(inputs) / tokens
            return self._flops_per_token * tokens
    return HostCountingTrainer


def train_or_name_next_rung(trainer, plan: memplan.Plan, resume: Path | None):
    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.OutOfMemoryError as e:
        raise out_of_memory(plan, e) from None


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
    """The train loss (and the eval loss where it was computed during training) by step, as a CSV and
    a picture for whoever does not run `dvc plots`. Only the log of training itself: the eval loss
    computed after it (of the kept adapter) is the summary's, not a point of the curve."""
    end = next((i for i, h in enumerate(history) if "train_loss" in h), len(history))  # the summary entry
    history = history[:end]
    points = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")} for h in history if "loss" in h]
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    for p in points:
        p["eval_loss"] = evals.get(p["step"])
    with atomic_path(layout.LOSS_CSV) as tmp:
        pd.DataFrame(points, columns=["step", "loss", "lr", "eval_loss"]).to_csv(tmp, index=False)
    series = {"train": ([p["step"] for p in points], [p["loss"] for p in points])}
    if evals:
        series["eval"] = (list(evals), list(evals.values()))
    line_plot(layout.LOSS_PNG, series, title="loss", xlabel="optimizer step", ylabel="loss (trained tokens)")
    return points
