#!/usr/bin/env bash
# The GPU code paths of train, merge and evaluate on the device image (its own torch/transformers/peft),
# on the bundled data: LoRA (bf16) and QLoRA (4-bit nf4), each merged (checked) and evaluated.
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
for method in lora qlora; do
  sed -e "s/^  method: lora/  method: $method/" -e "s/^  dtype: auto\$/  dtype: auto/" params.yaml > /tmp/params-$method.yaml
  # merge in float32 so the check is about the merge, not about bf16 rounding
  python3 - "$method" <<'PY'
import sys, yaml
m = sys.argv[1]; p = yaml.safe_load(open(f"/tmp/params-{m}.yaml"))
p["merge"]["dtype"] = "float32"
yaml.safe_dump(p, open(f"/tmp/params-{m}.yaml", "w"))
PY
  for stage in train merge evaluate; do
    python3 -m tasks.$stage --params /tmp/params-$method.yaml 2>&1 | grep -E "done in|error|Error" | tail -2
  done
  mkdir -p "$OUT/$method"
  cp reports/stages/train.json reports/stages/merge.json reports/merge_check.json reports/metrics.json "$OUT/$method/"
done
