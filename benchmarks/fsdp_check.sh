#!/usr/bin/env bash
# FSDP code path on one GPU (a 2-GPU machine was not lent): the train stage's own launch
# (loraflow.distributed, accelerate FSDP config) with world size 1, for LoRA and QLoRA, on the bundled
# tiny model and data prepared on CPU (.bench/fsdp: data/ and models/base from `dvc repro tokenize`).
# Checks that FSDP wrapped the model, that QLoRA's 4-bit weights were stored in bf16 (shardable), and
# that the one adapter written loads with PEFT.  Usage: bash benchmarks/fsdp_check.sh OUT_DIR
set -euo pipefail
out=${1:?out dir}
root=$(pwd)
ws=$(mktemp -d)
cp -r tasks loraflow params.yaml "$ws"/ && cp -r .bench/fsdp/data .bench/fsdp/models "$ws"/
cd "$ws"
export PYTHONPATH="$ws:${PYTHONPATH:-}"
for method in lora qlora; do
  rm -rf models/adapter models/checkpoints reports/stages/train.json
  python - "$method" <<'PY'
import json, sys
from loraflow.params import load_section
from loraflow.stage import configure_logging
from tasks.train import launch_processes
configure_logging()
# the whole head beside the adapter: token rows cannot be sharded yet (tasks.train.refuse_sharded_token_rows)
params = load_section("train", "params.yaml").model_copy(update={"method": sys.argv[1], "max_steps": 10,
                                                                  "trainable_tokens": [], "modules_to_save": ["lm_head"]})
summary = launch_processes(params, 1, fsdp=True)
print(json.dumps({k: v for k, v in summary.items() if k != "launch_config"}))
PY
  cp reports/stages/train.json "$out/fsdp-$method.json"
  python - "$method" <<'PY'
import sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
saved = load_file("models/adapter/adapter_model.safetensors")
base = AutoModelForCausalLM.from_pretrained("models/base", dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, "models/adapter")
lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
saved_lora = {k: t for k, t in saved.items() if "lora_" in k}
trained_b = sum(int(t.abs().sum() > 0) for k, t in saved_lora.items() if "lora_B" in k)
assert len(saved_lora) == len(lora) > 0, f"adapter file holds {len(saved_lora)} LoRA tensors, the model has {len(lora)}"
assert trained_b == len(lora) // 2, f"only {trained_b} of {len(lora) // 2} lora_B are nonzero: not trained"
others = sorted(k for k in saved if "lora_" not in k)  # modules_to_save: lm_head
print(f"{sys.argv[1]}: adapter has all {len(lora)} LoRA tensors, every lora_B trained, plus {others}; loads with PEFT")
PY
done
