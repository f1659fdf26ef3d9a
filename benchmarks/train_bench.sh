#!/usr/bin/env bash
# The issue-6 training benchmarks on one H200, ours and the peer in one run; JSON lines into $OUT.
#   bash benchmarks/train_bench.sh [plan|speed|all]
# plan:  predicted vs measured peak, 8B LoRA / 8-bit / QLoRA x 512, 2048, 8192 tokens, no checkpointing
# speed: P1 (LoRA 2048, no cap), P2 (24 GiB budget), P3 (QLoRA, 7 GiB budget) and the plain-HF peers
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CKPT=/dev/shm/llama31-8b-random
B="python3 benchmarks/train_bench.py"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, liger_kernel, trl; from importlib.metadata import version as v; print({p: v(p) for p in ['torch','transformers','peft','bitsandbytes','liger-kernel','trl','accelerate']})" >> "$OUT/device.txt" 2>&1
[ -d $CKPT ] || $B make $CKPT 2>&1 | tail -1
if [ "$what" = plan ] || [ "$what" = all ]; then
  for m in lora qlora lora8; do
    $B ours $CKPT --method $m --seqs 512,2048,8192 --rows 1 --micro 1 --checkpoint 0 --steps 4 2>"$OUT/err_plan_$m.txt" | grep '^{' >> "$OUT/plan.jsonl"
    tail -3 "$OUT/err_plan_$m.txt"
  done
fi
if [ "$what" = speed ] || [ "$what" = all ]; then
  $B ours $CKPT --method lora --seqs 2048 --rows 8 --steps 5 2>"$OUT/err_p1.txt" | grep '^{' | sed 's/^{/{"rung": "P1", /' >> "$OUT/speed.jsonl"; tail -2 "$OUT/err_p1.txt"
  $B ours $CKPT --method lora --seqs 2048 --rows 8 --steps 5 --budget-gib 24 2>"$OUT/err_p2.txt" | grep '^{' | sed 's/^{/{"rung": "P2", /' >> "$OUT/speed.jsonl"; tail -2 "$OUT/err_p2.txt"
  $B ours $CKPT --method qlora --seqs 2048 --rows 1 --steps 6 --budget-gib 7 2>"$OUT/err_p3.txt" | grep '^{' | sed 's/^{/{"rung": "P3", /' >> "$OUT/speed.jsonl"; tail -2 "$OUT/err_p3.txt"
  for rung in lora qlora lora_liger; do
    $B peer $CKPT $rung 2048 1 2>>"$OUT/err_peer.txt" | grep '^{' | sed 's/^{/{"bench": "peer", /' >> "$OUT/speed.jsonl"
  done
  tail -2 "$OUT/err_peer.txt"
fi
cat "$OUT"/*.jsonl
