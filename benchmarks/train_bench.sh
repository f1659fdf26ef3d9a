#!/usr/bin/env bash
# Training speed and memory on one H200: loraflow's train path and the peers in one run; JSON lines into $OUT.
#   bash benchmarks/train_bench.sh [plan|speed|all|p3] [methods for plan, default "lora qlora lora8"]
# plan:  predicted vs measured peak, 8B LoRA / 8-bit / QLoRA x 512, 2048, 8192 tokens, no checkpointing
# speed: workloads P1 (LoRA 2048, no cap), P2 (24 GiB budget), P3 (QLoRA, 8 GiB budget: 7.2 usable after the
#        plan's margin; 8-bit AdamW as the peer), the plain-HF peers, and P4 (variable-length SFT: ours, TRL defaults, TRL
#        padding-free + Liger)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CKPT=/dev/shm/llama31-8b-random
B="python3 benchmarks/train_bench.py"
what=${1:-all}; methods=${2:-"lora qlora lora8"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt"
python3 -c "from importlib.metadata import version as v; print({p: v(p) for p in ['torch','transformers','peft','bitsandbytes','liger-kernel','trl','accelerate']})" >> "$OUT/device.txt" 2>&1
[ -d $CKPT ] || $B make $CKPT 2>&1 | tail -1
keep() { grep '^{"' | sed "s/^{/{\"workload\": \"$1\", /"; }
if [ "$what" = plan ] || [ "$what" = all ]; then
  for m in $methods; do
    $B ours $CKPT --method $m --seqs 512,2048,8192 --rows 1 --micro 1 --checkpoint 0 --steps 4 2>>"$OUT/err.txt" | keep "plan-$m" >> "$OUT/results.jsonl"
  done
fi
if [ "$what" = speed ] || [ "$what" = all ]; then
  $B ours $CKPT --method lora --seqs 2048 --rows 8 --steps 5 2>>"$OUT/err.txt" | keep P1 >> "$OUT/results.jsonl"
  $B ours $CKPT --method lora --seqs 2048 --rows 8 --steps 5 --budget-gib 24 2>>"$OUT/err.txt" | keep P2 >> "$OUT/results.jsonl"
  $B ours $CKPT --method qlora --seqs 2048 --rows 8 --steps 6 --budget-gib 8 --optimizer adamw_8bit 2>>"$OUT/err.txt" | keep P3 >> "$OUT/results.jsonl"
  for peer in lora qlora lora_liger; do  # gpu_ladder.py's own names for its workloads
    $B peer $CKPT $peer 2048 1 2>>"$OUT/err.txt" | keep "peer-$peer" >> "$OUT/results.jsonl"
  done
  for who in ours trl_default trl_padding_free_liger; do
    timeout 150 python3 benchmarks/sft_bench.py $CKPT $who --rows 8 --steps 10 2>>"$OUT/err.txt" | keep P4 >> "$OUT/results.jsonl"
  done
fi
if [ "$what" = p3 ]; then  # P3 alone, twice, with its peer after each; 8 rows a step, as P1 and P2
  for i in 1 2; do
    $B ours $CKPT --method qlora --seqs 2048 --rows 8 --steps 8 --budget-gib 8 --optimizer adamw_8bit 2>>"$OUT/err.txt" | keep P3 >> "$OUT/results.jsonl"
    $B peer $CKPT qlora 2048 1 2>>"$OUT/err.txt" | keep "peer-qlora" >> "$OUT/results.jsonl"
  done
fi
$B summary "$OUT/results.jsonl" | tee "$OUT/summary.txt"
grep -v "cutedsl\|_ascend\|use_return_dict\|Loading weights\|examples/s\|MatMul8bitLt" "$OUT/err.txt" | tail -8 > "$OUT/err_tail.txt"
cat "$OUT/results.jsonl" "$OUT/err_tail.txt"
