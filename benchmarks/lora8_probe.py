"""Diagnostic: bytes per token that one training forward keeps alive, per adapted projection, on an
8-bit base vs a bf16 base (Llama-3.1-8B layer shapes, 2 layers, random init). Explains the memory
plan's 8-bit term. python benchmarks/lora8_probe.py"""
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_bench import save_random_llama  # noqa: E402
from loraflow import fastpath  # noqa: E402

T = 4096


def probe(path, method, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_8bit=True) if method == "lora8" else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant, device_map={"": 0},
                                                 attn_implementation=fastpath.register_packed_attention())
    fastpath.apply_fused_kernels(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    fastpath.keep_adapter_inputs_in_compute_dtype(model)
    model.train()
    batch = fastpath.packed_collator(0)([{"input_ids": list(range(5, 5 + T)), "labels": list(range(5, 5 + T))}])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    torch.cuda.synchronize(); before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    torch.cuda.synchronize(); after = torch.cuda.memory_allocated()
    del loss, model; gc.collect(); torch.cuda.empty_cache()
    return (after - before) / T / 2


def main():
    path = save_random_llama("/dev/shm/probe2", layers=2)
    for targets in (["q_proj"], ["o_proj"], ["gate_proj"], ["down_proj"], "all-linear"):
        out = {m: round(probe(path, m, targets)) for m in ("lora", "lora8")}
        print(json.dumps({"targets": targets, "bytes_per_token_per_layer": out, "lora8_extra": out["lora8"] - out["lora"]}), flush=True)


if __name__ == "__main__":
    main()
