"""Speed must not change the math, on the GPU: the train stage's plain path (padded batches, sdpa,
no fused kernels, no checkpointing) and its fast path (packed rows with flash varlen attention, Liger
kernels, half the layers checkpointed with their inputs offloaded to CPU memory, micro-batches of 4)
train the same LoRA adapter on the same rows and seed: variable-length rows (FlashAttention-2 varlen),
then rows of one length (the cuDNN path for equal rows), then variable-length rows with the first 40%
of each masked as a prompt (the fast path's head and Liger's loss on the trained positions alone).
Prints the loss curves and their largest relative difference.

    python benchmarks/fastpath_equivalence.py            (CUDA; a 4-layer Llama-3.1-8B-shaped model)
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sft_bench import rows  # noqa: E402
from benchmarks.train_bench import masked_prompt, save_random_llama  # noqa: E402

TOLERANCE = 1e-3  # bf16 compute: different kernels round differently (measured: 8e-5 over 12 steps)


def curve(path, fast: bool, data, prompt_share: float = 0.0):
    from loraflow.modeling import BaseRef, load_config
    from loraflow.params import TrainParams
    from loraflow import planning, training
    ref = BaseRef(path)
    params = TrainParams(method="lora", rank=16, alpha=32, target_modules="all-linear", rows_per_step=8, lr=1e-3,
                         max_steps=12, save_steps=10**6, logging_steps=1, seed=0, warmup_ratio=0.0,
                         packing=fast, fused_kernels=fast, gradient_checkpointing=2 if fast else False,
                         micro_batch=4 if fast else 8, offload_checkpoints=fast)
    config = load_config(ref)
    speed = planning.resolve_speed(params, config.model_type)
    plan = planning.make_plan(params, config, max(map(len, data)), speed, torch.bfloat16)
    model = training.build_peft_model(params, ref, torch.bfloat16, plan.chosen.setup, speed)
    ds = [{"input_ids": r, "labels": masked_prompt(r, prompt_share)} for r in data]
    trainer = training.make_trainer(params, model, plan, speed, ds, None, 0, Path(f"/tmp/equiv_{fast}"), torch.bfloat16)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], speed


def main():
    path = save_random_llama("/dev/shm/equiv-4l", layers=4)
    varied = [r[:1024] for r in rows(96, 4096)]  # token ids below 4096: a loss the adapter can lower
    equal = [(r * (1024 // len(r) + 1))[:1024] for r in varied]  # every row 1024 tokens
    for name, data, share in (("variable-length rows", varied, 0.0), ("rows of one length", equal, 0.0),
                              ("variable-length rows, 40% masked as prompts", varied, 0.4)):
        plain, s_plain = curve(path, False, data, share)
        fast, s_fast = curve(path, True, data, share)
        rel = max(abs(a - b) / abs(a) for a, b in zip(plain, fast))
        print(json.dumps({"bench": "fastpath_equivalence", "rows": name, "plain": plain, "fast": fast,
                          "plain_speed": vars(s_plain), "fast_speed": vars(s_fast), "offload_checkpoints": True,
                          "max_rel_diff": round(rel, 5), "tolerance": TOLERANCE, "within": rel <= TOLERANCE}),
              flush=True)


if __name__ == "__main__":
    main()
