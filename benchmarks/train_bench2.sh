#!/usr/bin/env bash
# Second H200 run: P2 and P3 with the plan's occupancy-aware choice, P4 (variable-length SFT against TRL),
# and the 8-bit activation probe. JSON lines into $OUT/run2.jsonl.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CKPT=/dev/shm/llama31-8b-random
B="python3 benchmarks/train_bench.py"
[ -d $CKPT ] || $B make $CKPT 2>&1 | tail -1
{
  python3 benchmarks/lora8_probe.py 2>/dev/null | grep '^{'
  $B ours $CKPT --method lora --seqs 2048 --rows 8 --steps 5 --budget-gib 24 2>/dev/null | grep '^{' | sed 's/^{/{"workload": "P2", /'
  $B ours $CKPT --method qlora --seqs 2048 --rows 1 --steps 6 --budget-gib 8 2>/dev/null | grep '^{' | sed 's/^{/{"workload": "P3", /'
  for who in ours trl_default trl_padding_free_liger; do
    timeout 150 python3 benchmarks/sft_bench.py $CKPT $who --rows 8 --steps 10 2>"$OUT/err_p4_$who.txt" | grep '^{'
  done
} | tee "$OUT/run2.jsonl"
for f in "$OUT"/err_p4_*.txt; do echo "== $f"; grep -v "cutedsl\|_ascend\|use_return_dict" "$f" | tail -4; done
