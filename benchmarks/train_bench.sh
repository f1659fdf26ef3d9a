#!/usr/bin/env bash
# Training speed and memory on one H200: loraflow's train path and the peers in one run; JSON lines into $OUT.
#   bash benchmarks/train_bench.sh [plan|speed|all|p3|t|t4|t3profile|profiles|attention|ab1|ab2|ab3|ab5|t5|goals] [methods for plan, default "lora qlora lora8"]
# plan:  predicted vs measured peak, 8B LoRA / 8-bit / QLoRA x 512, 2048, 8192 tokens, no checkpointing
# speed: workloads P1 (LoRA 2048, no cap), P2 (24 GiB budget), P3 (QLoRA, 8 GiB budget: 7.2 usable after the
#        plan's margin; 8-bit AdamW as the peer), the plain-HF peers, and P4 (variable-length SFT: ours, TRL defaults, TRL
#        padding-free + Liger)
# t:     issue 18's goals against Unsloth in the same run (needs .whl-unsloth, from ../shared/device/unsloth.sh):
#        T1 LoRA 8 x 2048 no cap, T2 within 24 GiB, T3 QLoRA at Unsloth's 6.8 GiB; ours with loraflow's fused LoRA
#        projections and, for T1, with peft's (the A/B); then profiles of both (where the time goes)
# t4:    the Qwen2.5-7B shape, LoRA 4 x 4096 within 24 GiB, ours and Unsloth
# t3profile: where a QLoRA step's time goes; attention: attention backends timed alone (attention_probe.py)
# ab1:   T1 with cuDNN attention for equal rows and with FA2 varlen (the A/B), T3 with and without offloaded
#        checkpoints, their Unsloth runs, the GPU equivalence check, T3's sync sites and profile
# ab2:   T4 (both attentions) and T2 (with and without offloaded checkpoints), with Unsloth
# ab3:   T3, T4, T2 with Unsloth; then T2 and T3 without offloaded checkpoints, T4 on its old path; the GPU equivalence check
# ab5:   ab3's first part: T3 and T2 (with and without offloaded checkpoints) with Unsloth
# profiles: T1, T2 and T3 under torch.profiler, ours (PROFILE_TRACE=1: with the timeline) and Unsloth
# t5:    variable-length SFT: ours, Unsloth (TRL padding-free, its patches), TRL padding-free + Liger
# goals: T4, T2, T3, T1 (on a GPU under 100 GB: at the plan's micro-batch for its memory, Unsloth at 8 and 4 rows), ours and Unsloth; with OLD=<dir> (a copy of an earlier
#        tree's loraflow/ and benchmarks/) that tree's ours beside, for the A/B (on the workloads in AB, default
#        all). Before them: the LoRA matrices' GEMMs alone, both forms (lora_gemm_probe.py), the host copy
#        rates, and in the background the host CPU's determinism hashes (cpu_determinism_probe.py
#        --pipeline, into cpu_probe.json); after them the 8-bit AdamW step alone (optim8bit_probe.py) and
#        T1's GEMMs alone (gemm_floor_probe.py). GOALS="T4 T1" runs those only. M2 (not in the default set):
#        T2 with 40% of each row masked as a prompt, ours with the head on the trained positions and on all, Unsloth
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CKPT=/dev/shm/llama31-8b-random
B="python3 benchmarks/train_bench.py"
what=${1:-all}; methods=${2:-"lora qlora lora8"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt"
python3 -c "from importlib.metadata import version as v; print({p: v(p) for p in ['torch','transformers','peft','bitsandbytes','liger-kernel','trl','accelerate']})" >> "$OUT/device.txt" 2>&1
[ -d $CKPT ] || python3 benchmarks/peers/peers_best.py make $CKPT 2>&1 | tail -1  # with a stub tokenizer, which Unsloth loads
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
unsloth_site() {
  if [ ! -d /tmp/site_u ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_u \
      .whl/bitsandbytes-*.whl .whl/liger_kernel-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl .whl-unsloth/*.whl \
      && tar -xzf .whl-unsloth/unsloth.tgz -C /tmp/site_u
  fi
}
U() { env PYTHONPATH=/tmp/site_u HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 240 \
        python3 benchmarks/peers/peers_best.py unsloth "$@" 2>>"$OUT/err.txt"; }
O() { timeout 200 $B ours "$@" 2>>"$OUT/err.txt"; }
if [ "$what" = t ]; then
  unsloth_site
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 | keep T1 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --peft-projections | keep T1 >> "$OUT/results.jsonl"
  U $CKPT 2048 8 lora false | keep T1 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24 | keep T2 >> "$OUT/results.jsonl"
  U $CKPT 2048 8 lora unsloth | keep T2 >> "$OUT/results.jsonl"
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 6 --budget-gib 8 --optimizer adamw_8bit | keep T3 >> "$OUT/results.jsonl"
  U $CKPT 2048 2 qlora unsloth | keep T3 >> "$OUT/results.jsonl"
  for ab in "" --peft-projections; do
    O $CKPT --method lora --seqs 2048 --rows 8 --steps 3 --profile $ab | keep profile >> "$OUT/results.jsonl"
  done
fi
if [ "$what" = goals ]; then  # every goal that fits this GPU: ours (this tree, OLD's if given) and Unsloth
  unsloth_site
  QW=/dev/shm/qwen25-7b-random
  goal() { case " ${GOALS:-T4 T2 T3 T1 copy optim gemm lora cpu} " in *" $1 "*) return 0;; esac; return 1; }
  # the CPU determinism probe on the host's CPU (an Intel Xeon), beside the GPU work: two threads of 16
  goal cpu && { timeout 200 python3 benchmarks/cpu_determinism_probe.py --pipeline --json "$OUT/cpu_probe.json" \
                  >/dev/null 2>>"$OUT/err.txt" & }
  # the short probes first, so a call cut short still brings them back
  goal lora && timeout 90 python3 benchmarks/lora_gemm_probe.py 2>>"$OUT/err.txt" | keep lora-gemms >> "$OUT/results.jsonl"
  goal copy && timeout 60 python3 benchmarks/host_copy_probe.py 2>>"$OUT/err.txt" | keep copy >> "$OUT/results.jsonl"
  goal T4 && { [ -d $QW ] || $B make-qwen $QW 2>&1 | tail -1; }
  both() {  # workload tag, then the arguments of train_bench.py ours
    local tag=$1 trees=$PWD; shift
    case " ${AB:-T1 T2 T3 T4} " in *" $tag "*) trees="$PWD ${OLD:-}";; esac
    for tree in $trees; do
      (cd $tree && PYTHONPATH=$tree:/tmp/site timeout 200 python3 benchmarks/train_bench.py ours "$@" 2>>"$OUT/err.txt") \
        | keep "$tag" | sed "s|^{|{\"tree\": \"$(basename $tree)\", |" >> "$OUT/results.jsonl"
    done
  }
  if goal T4; then
    both T4 $QW --method lora --seqs 4096 --rows 4 --steps 6 --budget-gib 24
    U $QW 4096 4 lora unsloth | keep T4 >> "$OUT/results.jsonl"
  fi
  if goal T2; then
    both T2 $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24
    U $CKPT 2048 8 lora unsloth | keep T2 >> "$OUT/results.jsonl"
  fi
  if goal T3; then
    both T3 $CKPT --method qlora --seqs 2048 --rows 8 --steps 6 --budget-gib 8 --optimizer adamw_8bit
    U $CKPT 2048 2 qlora unsloth | keep T3 >> "$OUT/results.jsonl"
  fi
  if goal T1; then  # no cap: the plan fits the GPU's own memory (micro-batch 8 needs 84 GiB; an 80 GB card gets 4)
    both T1 $CKPT --method lora --seqs 2048 --rows 8 --steps 6
    U $CKPT 2048 8 lora false | keep T1 >> "$OUT/results.jsonl"  # 76 GiB: it still fits an 80 GB H100 (run 32)
    if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits)" -lt 100000 ]; then
      U $CKPT 2048 4 lora false | keep T1 >> "$OUT/results.jsonl"  # Unsloth at our micro-batch, no checkpointing
    fi
  fi
  if goal M2; then  # T2 with 40% of each row masked as a prompt: the head on trained positions only, the whole head, Unsloth
    both M2 $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24 --prompt-share 0.4
    O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24 --prompt-share 0.4 --whole-head | keep M2 >> "$OUT/results.jsonl"
    env PYTHONPATH=/tmp/site_u HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 240 python3 benchmarks/peers/unsloth_masked.py \
      0.4 $CKPT 2048 8 lora unsloth 2>>"$OUT/err.txt" | keep M2 >> "$OUT/results.jsonl"
  fi
  goal optim && timeout 90 python3 benchmarks/optim8bit_probe.py 2>>"$OUT/err.txt" | keep optim8bit >> "$OUT/results.jsonl"
  goal gemm && timeout 90 python3 benchmarks/gemm_floor_probe.py 2>>"$OUT/err.txt" | keep gemm-floor >> "$OUT/results.jsonl"
  wait  # the CPU probe
fi
if [ "$what" = t4 ] || [ "$what" = t3profile ] || [ "$what" = ab1 ] || [ "$what" = ab2 ] || [ "$what" = ab3 ] || [ "$what" = ab5 ]; then
  unsloth_site
fi
if [ "$what" = ab1 ]; then  # cuDNN attention for equal rows (A/B against FA2 varlen), cast weights kept; Unsloth beside
  for shape in "2048 8" "4096 4"; do
    python3 benchmarks/attention_probe.py $shape 2>>"$OUT/err.txt" | keep attention >> "$OUT/results.jsonl"
  done
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 | keep T1 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --attention varlen | keep T1 >> "$OUT/results.jsonl"
  U $CKPT 2048 8 lora false | keep T1 >> "$OUT/results.jsonl"
  # T3: the plan's choice (offloaded checkpoints let micro-batch 4 fit), then without offloading (micro-batch 2)
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 6 --budget-gib 8 --optimizer adamw_8bit | keep T3 >> "$OUT/results.jsonl"
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 6 --budget-gib 8 --optimizer adamw_8bit --offload-checkpoints false | keep T3 >> "$OUT/results.jsonl"
  U $CKPT 2048 2 qlora unsloth | keep T3 >> "$OUT/results.jsonl"
  timeout 150 python3 benchmarks/fastpath_equivalence.py 2>>"$OUT/err.txt" | keep equivalence >> "$OUT/results.jsonl"
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 2 --budget-gib 8 --optimizer adamw_8bit --sync-debug | keep T3-syncs >> "$OUT/results.jsonl"
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 3 --budget-gib 8 --optimizer adamw_8bit --profile | keep profile >> "$OUT/results.jsonl"
fi
if [ "$what" = t5 ]; then  # variable-length SFT (P4's rows): ours, Unsloth through TRL padding-free, TRL padding-free + Liger
  unsloth_site
  timeout 200 python3 benchmarks/sft_bench.py $CKPT ours --rows 8 --steps 10 2>>"$OUT/err.txt" | keep T5 >> "$OUT/results.jsonl"
  env PYTHONPATH=/tmp/site_u:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 240 \
    python3 benchmarks/sft_bench.py $CKPT unsloth --rows 8 --steps 10 2>>"$OUT/err.txt" | keep T5 >> "$OUT/results.jsonl"
  timeout 200 python3 benchmarks/sft_bench.py $CKPT trl_padding_free_liger --rows 8 --steps 10 2>>"$OUT/err.txt" | keep T5 >> "$OUT/results.jsonl"
fi
if [ "$what" = ab5 ]; then  # the short form of ab3: T3 and T2 (with and without offloaded checkpoints), Unsloth beside
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 5 --budget-gib 8 --optimizer adamw_8bit | keep T3 >> "$OUT/results.jsonl"
  U $CKPT 2048 2 qlora unsloth | keep T3 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 5 --budget-gib 24 | keep T2 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 5 --budget-gib 24 --offload-checkpoints false | keep T2 >> "$OUT/results.jsonl"
  U $CKPT 2048 8 lora unsloth | keep T2 >> "$OUT/results.jsonl"
fi
if [ "$what" = ab3 ]; then  # after ab1's fixes: T3, T4, T2 with Unsloth, then the A/Bs (no offloading, FA2 varlen), equivalence
  QW=/dev/shm/qwen25-7b-random
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 6 --budget-gib 8 --optimizer adamw_8bit | keep T3 >> "$OUT/results.jsonl"
  U $CKPT 2048 2 qlora unsloth | keep T3 >> "$OUT/results.jsonl"
  [ -d $QW ] || $B make-qwen $QW 2>&1 | tail -1
  O $QW --method lora --seqs 4096 --rows 4 --steps 6 --budget-gib 24 | keep T4 >> "$OUT/results.jsonl"
  U $QW 4096 4 lora unsloth | keep T4 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24 | keep T2 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24 --offload-checkpoints false | keep T2 >> "$OUT/results.jsonl"
  U $CKPT 2048 8 lora unsloth | keep T2 >> "$OUT/results.jsonl"
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 6 --budget-gib 8 --optimizer adamw_8bit --offload-checkpoints false | keep T3 >> "$OUT/results.jsonl"
  O $QW --method lora --seqs 4096 --rows 4 --steps 6 --budget-gib 24 --attention varlen --offload-checkpoints false | keep T4 >> "$OUT/results.jsonl"
  timeout 150 python3 benchmarks/fastpath_equivalence.py 2>>"$OUT/err.txt" | keep equivalence >> "$OUT/results.jsonl"
fi
if [ "$what" = ab2 ]; then  # the same for T4 and T2
  QW=/dev/shm/qwen25-7b-random
  [ -d $QW ] || $B make-qwen $QW 2>&1 | tail -1
  O $QW --method lora --seqs 4096 --rows 4 --steps 6 --budget-gib 24 | keep T4 >> "$OUT/results.jsonl"
  O $QW --method lora --seqs 4096 --rows 4 --steps 6 --budget-gib 24 --attention varlen | keep T4 >> "$OUT/results.jsonl"
  U $QW 4096 4 lora unsloth | keep T4 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24 | keep T2 >> "$OUT/results.jsonl"
  O $CKPT --method lora --seqs 2048 --rows 8 --steps 6 --budget-gib 24 --offload-checkpoints false | keep T2 >> "$OUT/results.jsonl"
  U $CKPT 2048 8 lora unsloth | keep T2 >> "$OUT/results.jsonl"
fi
if [ "$what" = t4 ]; then  # the Qwen2.5-7B shape, LoRA within 24 GiB at 4096 tokens
  QW=/dev/shm/qwen25-7b-random
  [ -d $QW ] || $B make-qwen $QW 2>&1 | tail -1
  O $QW --method lora --seqs 4096 --rows 4 --steps 6 --budget-gib 24 | keep T4 >> "$OUT/results.jsonl"
  U $QW 4096 4 lora unsloth | keep T4 >> "$OUT/results.jsonl"
fi
if [ "$what" = t3profile ]; then
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 2 --budget-gib 8 --optimizer adamw_8bit --sync-debug | keep T3-syncs >> "$OUT/results.jsonl"
  O $CKPT --method qlora --seqs 2048 --rows 8 --steps 3 --budget-gib 8 --optimizer adamw_8bit --profile | keep profile >> "$OUT/results.jsonl"
fi
if [ "$what" = profiles ]; then  # T1, T2 and T3 under the profiler: ours (with the timeline) and Unsloth, same kernel kinds
  # PROFILES picks some (T1 T2 T3 ours, U1 U2 U3 Unsloth's; default T2 T3 U2 U3); T2's and T3's bring back 2 files
  # each (T1's 1, no timeline), and $OUT returns 8 at most. U1: Unsloth without checkpointing at 4 rows, the
  # micro-batch the plan gives T1 on an 80 GB card (8 rows take 76 GiB before the profiler's own)
  unsloth_site
  want() { case " ${PROFILES:-T2 T3 U2 U3} " in *" $1 "*) return 0;; esac; return 1; }
  want T1 && O $CKPT --method lora --seqs 2048 --rows 8 --steps 3 --profile | keep T1-profile >> "$OUT/results.jsonl"
  want T2 && PROFILE_TRACE=1 O $CKPT --method lora --seqs 2048 --rows 8 --steps 3 --budget-gib 24 --profile | keep T2-profile >> "$OUT/results.jsonl"
  want T3 && PROFILE_TRACE=1 O $CKPT --method qlora --seqs 2048 --rows 8 --steps 2 --budget-gib 8 --optimizer adamw_8bit --profile | keep T3-profile >> "$OUT/results.jsonl"
  for w in "U1 2048 4 lora false" "U2 2048 8 lora unsloth" "U3 2048 2 qlora unsloth"; do
    set -- $w
    want $1 && env PYTHONPATH=/tmp/site_u:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 240 \
      python3 benchmarks/peers/profile_unsloth.py $CKPT $2 $3 $4 $5 2>>"$OUT/err.txt" | keep unsloth-profile >> "$OUT/results.jsonl"
  done
fi
if [ "$what" = attention ]; then
  for shape in "2048 8" "4096 4"; do
    python3 benchmarks/attention_probe.py $shape 2>>"$OUT/err.txt" | keep attention >> "$OUT/results.jsonl"
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
