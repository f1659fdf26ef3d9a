#!/usr/bin/env bash
# The GPU code paths of train, merge and evaluate on the device image (its own torch/transformers/peft),
# on the bundled data: LoRA (bf16), QLoRA (4-bit nf4), and QLoRA with the input embedding in CPU
# memory (train.embedding_on_cpu: true), each merged (checked) and evaluated; one JSON per run in $OUT.
# Run on the GPU machine from the project root, with .whl/ and data/processed/ carried:
#   bash benchmarks/gpu_pipeline_check.sh     (results under $OUT, or ./gpu_check_out)
set -euo pipefail
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LORAFLOW_LOG=INFO
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, transformers, peft, trl, bitsandbytes, platform
print(f"device {torch.cuda.get_device_name(0)}; torch {torch.__version__}; transformers {transformers.__version__}; "
      f"peft {peft.__version__}; trl {trl.__version__}; bitsandbytes {bitsandbytes.__version__}; python {platform.python_version()}")
PY
python3 -m tasks.base 2>&1 | tail -1
for run in ${RUNS:-lora qlora qlora_embedding_cpu}; do
  method=${run%%_*}
  sed -e "s/^  method: lora/  method: $method/" params.yaml > /tmp/params-$run.yaml
  # merge in float32 so the check is about the merge, not about bf16 rounding
  python3 - "$run" <<'PY'
import sys, yaml
run = sys.argv[1]; p = yaml.safe_load(open(f"/tmp/params-{run}.yaml"))
p["merge"]["dtype"] = "float32"
p["train"]["embedding_on_cpu"] = run.endswith("_embedding_cpu") or "auto"
if run.endswith("_embedding_cpu"):  # an input embedding in CPU memory is frozen: the head learns the chat tokens
    p["train"].update(trainable_tokens=[], modules_to_save=["lm_head"])
yaml.safe_dump(p, open(f"/tmp/params-{run}.yaml", "w"))
PY
  for stage in train merge evaluate; do
    python3 -m tasks.$stage --params /tmp/params-$run.yaml 2>&1 | grep -E "done in|error|Error" | tail -2
  done
  python3 - "$OUT/$run.json" <<'PY'
import csv, json, sys
read = lambda p: json.load(open(p))
json.dump({"train": read("reports/stages/train.json"), "plan": read("reports/memory_plan.json"),
           "merge": read("reports/stages/merge.json"), "merge_check": read("reports/merge_check.json"),
           "metrics": read("reports/metrics.json"), "loss_curve": list(csv.DictReader(open("reports/train_loss.csv")))},
          open(sys.argv[1], "w"), indent=1)
PY
done
