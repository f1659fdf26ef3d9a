"""P4: variable-length SFT on a GPU, useful (non-pad) tokens/s: loraflow's train path against TRL's
SFTTrainer with its defaults and TRL with padding-free + Liger, in one run, same model and rows.

    python benchmarks/sft_bench.py CKPT ours|trl_default|trl_padding_free_liger|unsloth [--rows 8 --steps 10]

unsloth (T5 of issue 18): Unsloth's FastLanguageModel through TRL's SFTTrainer, which Unsloth patches,
padding-free, no checkpointing (as ours with no memory cap); run it with Unsloth's own site first on
PYTHONPATH (benchmarks/train_bench.sh t5).

Row lengths: lognormal with median 350 tokens and sigma 0.9, clipped to [16, 2048] (seed 0): a long
right tail like instruction/chat SFT sets (most rows a few hundred tokens, a few near the limit).
Every token is trained. TRL runs with its defaults (batch 8, gradient checkpointing on) except
max_length=2048, so that it trains the same, untruncated rows (None with padding-free, which TRL
requires there; no row is longer anyway).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.train_bench import PEAK_TFLOPS, param_count  # noqa: E402

MEDIAN, SIGMA, MIN_LEN, MAX_LEN = 350, 0.9, 16, 2048


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(MEDIAN), SIGMA, n).round(), MIN_LEN, MAX_LEN).astype(int).tolist()


def rows(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths(n)]


class Meter:
    """Counts the real tokens each forward sees and stamps optimizer-step ends."""
    def __init__(self, model):
        self.tokens, self.stamps = 0, []
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(kwargs["input_ids"].numel())

    def callback(self):
        from transformers import TrainerCallback
        meter = self

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                meter.stamps.append((time.perf_counter(), meter.tokens))
        return Stamp()

    def rate(self) -> float:
        (t0, n0), (t1, n1) = self.stamps[0], self.stamps[-1]
        return (n1 - n0) / (t1 - t0)


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def run_ours(ckpt: str, data: list[list[int]], rows_per_step: int, steps: int):
    from loraflow.modeling import BaseRef, load_config
    from loraflow.params import TrainParams
    from loraflow import planning, training
    ref = BaseRef(ckpt)
    config = load_config(ref)
    params = TrainParams(method="lora", rank=16, alpha=32, target_modules="all-linear", rows_per_step=rows_per_step,
                         max_steps=steps, save_steps=10**6, logging_steps=10**6, lr=2e-4)
    speed = planning.resolve_speed(params, config.model_type)
    plan = planning.make_plan(params, config, max(map(len, data)), speed, torch.bfloat16)
    model = training.build_peft_model(params, ref, torch.bfloat16, plan.chosen.setup, speed)
    meter = Meter(model)
    ds = [{"input_ids": r, "labels": r} for r in data]
    trainer = training.make_trainer(params, model, plan, speed, ds, None, 0, Path("/tmp/sft_ours"), torch.bfloat16,
                                 [meter.callback()])
    trainer.train()
    return meter, {"micro_batch": plan.chosen.micro_batch, "checkpoint_layers": plan.chosen.setup.checkpoint_layers,
                   "predicted_peak_gib": round(plan.chosen.peak_gib, 3)}


def run_trl(ckpt: str, data: list[list[int]], rows_per_step: int, steps: int, padding_free_liger: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0})
    # TRL refuses max_length with padding-free and no packing; the rows are <= MAX_LEN already
    extra = {"padding_free": True, "use_liger_kernel": True, "max_length": None} if padding_free_liger else {"max_length": MAX_LEN}
    args = SFTConfig(output_dir="/tmp/sft_trl", max_steps=steps, per_device_train_batch_size=rows_per_step,
                     save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": data}),
                         processing_class=tiny_tokenizer(),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    meter = Meter(trainer.model)
    trainer.add_callback(meter.callback())
    trainer.train()
    return meter, {"gradient_checkpointing": args.gradient_checkpointing, "padding_free": args.padding_free,
                   "use_liger_kernel": args.use_liger_kernel}


def run_unsloth(ckpt: str, data: list[list[int]], rows_per_step: int, steps: int):
    from unsloth import FastLanguageModel  # first: it patches transformers and TRL on import
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=ckpt, max_seq_length=MAX_LEN, dtype=torch.bfloat16,
                                                         load_in_4bit=False, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none", random_state=0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], use_gradient_checkpointing=False)
    args = SFTConfig(output_dir="/tmp/sft_unsloth", max_steps=steps, per_device_train_batch_size=rows_per_step,
                     save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True,
                     padding_free=True, max_length=None, bf16=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": data}),
                         processing_class=tokenizer)
    meter = Meter(trainer.model)
    trainer.add_callback(meter.callback())
    trainer.train()
    import unsloth
    return meter, {"padding_free": args.padding_free, "gradient_checkpointing": False,
                   "unsloth": getattr(unsloth, "__version__", "?")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt"); p.add_argument("who", choices=["ours", "trl_default", "trl_padding_free_liger", "unsloth"])
    p.add_argument("--rows", type=int, default=8); p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    if a.who == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as Unsloth requires)
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(a.ckpt)
    data = rows(a.rows * a.steps, config.vocab_size)
    torch.cuda.reset_peak_memory_stats()
    if a.who == "ours":
        meter, info = run_ours(a.ckpt, data, a.rows, a.steps)
    elif a.who == "unsloth":
        meter, info = run_unsloth(a.ckpt, data, a.rows, a.steps)
    else:
        meter, info = run_trl(a.ckpt, data, a.rows, a.steps, a.who == "trl_padding_free_liger")
    tok_s = meter.rate()
    mean_len = sum(map(len, data)) / len(data)
    print(json.dumps({"bench": "P4", "who": a.who, "rows_per_step": a.rows, "steps": a.steps,
                      "mean_len": round(mean_len, 1), "max_len": max(map(len, data)), "useful_tok_s": round(tok_s),
                      "mfu": round(tok_s * (4 * param_count(config) + 12 * config.num_hidden_layers * config.hidden_size
                                            * mean_len) / (PEAK_TFLOPS * 1e12), 3),
                      "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), **info}), flush=True)


if __name__ == "__main__":
    main()
