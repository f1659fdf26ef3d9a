#!/usr/bin/env bash
# G1 on one GPU, in one run: the kernels' bf16 checks; the matmul configuration sweep at the 8B's shapes
# (both matmul kernels: persistent TMA-fed and pointer-fed) and the attention kernels' times; generation
# with the swept configurations (batch 256 and 512); and the loop with the pointer-fed matmuls as Run 7
# had it (the A/B). Each generation line carries the workload's bound on this GPU.
#   bash benchmarks/generate_bench.sh          (results under $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/new" "$OUT/base"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "from importlib.metadata import version as v; print({p: v(p) for p in ['torch','transformers','triton']})"; } > "$OUT/device_gen.txt" 2>&1
timeout 120 python3 tests/triton_interpret_check.py > "$OUT/kernel_check.txt" 2>&1
timeout 360 python3 benchmarks/invariant_kernel_probe.py --decode-m 256 512 --write "$OUT/configs.json" \
  > "$OUT/sweep.jsonl" 2>>"$OUT/gen_log.txt"
grep '"best"\|attention_workload\|prefill_attention' "$OUT/sweep.jsonl"
timeout 200 python3 benchmarks/generate_bench.py --rows 512 --batch 256 512 --peer-rows 2 --configs "$OUT/configs.json" --profile \
  --out "$OUT/new" 2>&1 | grep -v "^ " >> "$OUT/gen_log.txt"
timeout 120 python3 benchmarks/generate_bench.py --rows 512 --batch 256 --peer-rows 0 --baseline --out "$OUT/base" \
  2>&1 | grep -v "^ " >> "$OUT/gen_log.txt"
grep '"batch"\|Error\|error' "$OUT/gen_log.txt" | tail -12
