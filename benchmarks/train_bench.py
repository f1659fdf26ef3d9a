"""Training speed and memory on a GPU: loraflow's train-stage path (tasks/train.py with the memory
plan and the fast path) on a random-init Llama-3.1-8B, beside the plain-HF peer from the same run.

    python benchmarks/train_bench.py make CKPT                      # random bf16 checkpoint (no hub here)
    python benchmarks/train_bench.py ours CKPT --method lora --seqs 512,2048,8192 --rows 1 --checkpoint 0
    python benchmarks/train_bench.py ours CKPT --method lora --seqs 2048 --rows 8 --budget-gib 24
    python benchmarks/train_bench.py peer CKPT lora 2048 1          # one of benchmarks/peers/gpu_ladder.py's workloads
    python benchmarks/train_bench.py summary results.jsonl          # ours / the peer of the same run, per workload

Each `ours` line: the plan's settings and predicted peak by part, the measured peak
(torch.cuda.max_memory_allocated over the run, what the peers report), tokens/s (median optimizer
step of steps 2..N), and MFU by the peers' formula.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEER = ROOT / "benchmarks/peers/gpu_ladder.py"
PEAK_TFLOPS = 989.0


def make(path: str) -> None:
    subprocess.run([sys.executable, str(PEER), "make", path], check=True)


def save_random_llama(path: str, layers: int, max_shard_size: str = "50GB") -> str:
    """A random bf16 model with Llama-3.1-8B's shapes and `layers` decoder layers, saved on the GPU's host."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size=max_shard_size)
    torch.set_default_dtype(torch.float32)
    return path


def save_random_qwen(path: str) -> str:
    """A random bf16 model with Qwen2.5-7B's shapes (q/k/v biases, vocabulary 152064) and a stub
    tokenizer (Unsloth loads one), for T4."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                      rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        Qwen2ForCausalLM(cfg).save_pretrained(path, max_shard_size="50GB")
    torch.set_default_dtype(torch.float32)
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, **{f"t{i}": i + 4 for i in range(4000)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return path


def param_count(config) -> int:
    """Every parameter of a dense decoder (embedding and head included), as the peers' MFU counts them."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return layers * (attention + 3 * h * i + 2 * h) + embeddings + h


def masked_prompt(row: list, share: float) -> list:
    """The row's labels with its first `share` masked (-100), as an SFT prompt is."""
    prompt = round(share * len(row))
    return [-100] * prompt + row[prompt:]


class Rows(torch.utils.data.Dataset):
    """Random token rows, every token trained (as the peers' workloads), or with the first
    `prompt_share` of each row masked as an SFT prompt is."""
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0, prompt_share: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(0, vocab, (seq,), generator=g).tolist() for _ in range(n)]
        self.prompt_share = prompt_share

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": masked_prompt(self.rows[i], self.prompt_share)}


def step_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Optimizer-step durations: the gaps between consecutive step ends."""
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        @property
        def times(self):
            return [b - a for a, b in zip(self.ends, self.ends[1:])]
    return Timer()


KERNEL_KINDS = (  # kernel-name fragments -> where the time goes (first match wins)
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("optimizer", ("multi_tensor", "adam")),
    ("loss", ("cross_entropy", "_ce_", "logsumexp")),
    ("norm, rope, swiglu (fused)", ("rms_norm", "rope", "swiglu", "silu")),
    ("copy, cat, cast", ("copy", "memcpy", "cat", "transpose", "to_copy")),
    ("elementwise, reduce", ("elementwise", "vectorized", "reduce", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def sync_sites(trainer, steps: int) -> None:
    """Where the host waits for the GPU: every synchronizing CUDA call of the run (a .item(), a copy
    from pageable memory, ...), counted by the Python call site and divided by the optimizer steps;
    each one drains the GPU's queue, which costs most where the host barely keeps ahead (QLoRA)."""
    import collections
    import traceback
    import warnings
    sites: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-4:]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown
    print(json.dumps({"sync_sites_per_step": {k: round(v / steps, 1) for k, v in sites.most_common(15)},
                      "syncs_per_step": round(sum(sites.values()) / steps, 1)}), flush=True)


def profile(run, tag: str) -> None:
    """Where a step's time goes while `run()` trains: the GPU's busy time against the wall clock, busy time by
    kind of kernel, the top kernels and host-side ops ($OUT/profile-TAG.txt), with PROFILE_TRACE=1 the timeline."""
    import os
    from torch.profiler import ProfilerActivity, profile as torch_profile
    # PROFILE_SHAPES=1: the ops by input shape too, to tell which call launches a kernel kind
    detail = bool(os.environ.get("PROFILE_SHAPES"))
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=detail) as prof:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6
    breakdown = {"tag": tag, "wall_s": round(wall, 3), "gpu_busy_s": round(busy, 3), "kernels": sum(e.count for e in kernels),
                 "by_kind_s": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}
    text = [json.dumps(breakdown), events.table(sort_by="self_device_time_total", row_limit=25),
            events.table(sort_by="self_cpu_time_total", row_limit=15)]
    if detail:
        text.append(prof.key_averages(group_by_input_shape=True).table(sort_by="self_device_time_total", row_limit=80))
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / f"profile-{tag}.txt").write_text("\n".join(text))
    if os.environ.get("PROFILE_TRACE"):  # the timeline, for the GPU's idle gaps (chrome://tracing or Perfetto)
        import gzip, shutil
        trace = out / f"trace-{tag}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb", compresslevel=6) as packed:
            shutil.copyfileobj(raw, packed)
        trace.unlink()
    print(json.dumps({"profile": breakdown}), flush=True)


def ours(args) -> None:
    from loraflow import memplan
    from loraflow.modeling import BaseRef, load_config
    from loraflow.params import TrainParams
    from loraflow import planning, training

    ref = BaseRef(args.ckpt)
    config = load_config(ref)
    if args.peft_projections:  # the A/B of loraflow/fused_lora.py: peft's own LoRA forward and backward
        from loraflow import fused_lora
        fused_lora.fuse_lora_projections = lambda model: 0
    if args.attention == "varlen":  # the A/B of the cuDNN path for equal rows (loraflow/fastpath.py)
        from loraflow import fastpath
        fastpath.DENSE_ATTENTION = False
    if args.whole_head:  # the A/B of fastpath.kept_logits: the head over every position, masked or not
        from loraflow import fastpath
        fastpath.kept_logits = lambda labels: {}
    if args.fused_layers_min_tokens is not None:
        memplan.FUSED_LAYERS_MIN_TOKENS = args.fused_layers_min_tokens
    seqs = [int(s) for s in args.seqs.split(",")]
    checkpoint = "auto" if args.checkpoint == "auto" else int(args.checkpoint)
    params = TrainParams(method=args.method, rank=16, alpha=32, target_modules="all-linear", rows_per_step=args.rows,
                         gradient_checkpointing=checkpoint, micro_batch="auto" if args.micro == "auto" else int(args.micro),
                         memory_budget_gib=args.budget_gib, packing=True, fused_kernels=not args.plain,
                         optimizer=args.optimizer, max_steps=args.steps, save_steps=10**6, logging_steps=10**6, lr=2e-4,
                         embedding_on_cpu={"auto": "auto", "true": True, "false": False}[args.embedding_on_cpu],
                         offload_checkpoints={"auto": "auto", "true": True, "false": False}[args.offload_checkpoints])
    speed = planning.resolve_speed(params, config.model_type)
    model, model_setup = None, None
    for seq in seqs:
        plan = planning.make_plan(params, config, seq, speed, torch.bfloat16)
        setup = plan.chosen.setup
        # a new setting that changes how the model is built needs a fresh one
        built_as = (setup.method, setup.checkpoint_layers, setup.fused_layers, setup.embedding_on_cpu,
                    setup.offload_checkpoints, setup.stashed_outputs)
        if model is None or built_as != model_setup:
            model = None
            gc.collect(); torch.cuda.empty_cache()
            t0 = time.perf_counter()
            model = training.build_peft_model(params, ref, torch.bfloat16, setup, speed)
            load_s = time.perf_counter() - t0
            model_setup = built_as
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timer = step_timer()
        data = Rows(args.rows * args.steps, seq, config.vocab_size, prompt_share=args.prompt_share)
        trainer = training.make_trainer(params, model, plan, speed, data, None, 0, Path("/tmp/bench_out"),
                                     torch.bfloat16, [timer])
        error = None
        try:
            if args.sync_debug:
                sync_sites(trainer, args.steps)
            elif args.profile:
                profile(trainer.train, f"{setup.method}-{seq}x{args.rows}-{'peft' if args.peft_projections else 'fused'}")
            else:
                trainer.train()
        except torch.OutOfMemoryError as e:
            error = str(e).splitlines()[0]
        peak = torch.cuda.max_memory_allocated()
        times = timer.times or [float("nan")]
        step = statistics.median(times)
        tokens = args.rows * seq
        tok_s = tokens / step
        flops = 4 * param_count(config) + 12 * config.num_hidden_layers * config.hidden_size * seq
        print(json.dumps({
            "bench": "ours", "method": setup.method, "optimizer": setup.optimizer, "seq": seq, "rows_per_step": args.rows,
            "micro_batch": plan.chosen.micro_batch, "checkpoint_layers": setup.checkpoint_layers,
            "fused": setup.fused, "fused_layers": setup.fused and setup.fused_layers,
            "lora_projections": "peft" if args.peft_projections else "fused", "attention": args.attention,
            "embedding_on_cpu": setup.embedding_on_cpu, "offload_checkpoints": setup.offload_checkpoints,
            "stashed_outputs": setup.stashed_outputs, "packing": speed.packing, "prompt_share": args.prompt_share,
            "head": "whole" if args.whole_head else "trained positions", "budget_gib": memplan.gib(plan.budget_bytes),
            "predicted_gib": {k: memplan.gib(v) for k, v in plan.chosen.parts.items()},
            "measured_peak_gib": memplan.gib(peak), "loaded_gib": memplan.gib(weights),
            "error_pct": round(100 * (plan.chosen.peak - peak) / peak, 1),
            "peak_reserved_gib": memplan.gib(torch.cuda.max_memory_reserved()),
            "step_s": round(step, 3), "steps_timed": len(times), "tok_s": round(tok_s), "mfu": round(tok_s * flops / (PEAK_TFLOPS * 1e12), 3),
            "load_s": round(load_s, 1), "oom": error}), flush=True)
        trainer.optimizer = None
        del trainer
        model.zero_grad(set_to_none=True)
        gc.collect(); torch.cuda.empty_cache()


PEER_OF = {"P1": "lora", "P2": "lora", "P3": "qlora"}  # peer lines keep gpu_ladder.py's own workload names


def summary(args) -> None:
    """One line per workload from a results file: ours, the peer of the same run, and their ratio.
    P1-P3 compare with the plain-HF ladder (gpu_ladder.py's workload names); T1-T4 with Unsloth's line of
    the same workload (peers_best.py)."""
    lines = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.startswith("{")]
    by_workload = {}
    for line in lines:  # results recorded before 2026-12 name the workload "rung"
        by_workload.setdefault(line.get("workload", line.get("rung")), []).append(line)
    pairs = [(w, by_workload.get(w, []), by_workload.get(p, [])) for w, p in PEER_OF.items()]
    pairs += [(w, [x for x in by_workload.get(w, []) if x.get("bench") == "ours"],
               [x for x in by_workload.get(w, []) if "peer" in x]) for w in ("T1", "T2", "T3", "T4")]
    for workload, ours_lines, peer_lines in pairs:
        for ours in ours_lines:
            for peer in peer_lines:
                tree = f" [{ours['tree']}]" if "tree" in ours else ""
                print(f"{workload}: ours{tree} ({ours.get('lora_projections', 'peft')} LoRA) {ours['tok_s']} tok/s, "
                      f"peak {ours['measured_peak_gib']} GiB (plan {ours.get('error_pct')}% off), MFU {ours['mfu']:.1%} | "
                      f"{peer.get('peer', '?')} {peer['tok_s']} tok/s, peak {peer['peak_alloc_gib']} GiB | "
                      f"ratio {ours['tok_s'] / peer['tok_s']:.2f}x")
    p4 = {line["who"]: line for line in by_workload.get("P4", [])}
    for who in ("trl_default", "trl_padding_free_liger"):
        if "ours" in p4 and who in p4:
            print(f"P4: ours {p4['ours']['useful_tok_s']} useful tok/s | {who} {p4[who]['useful_tok_s']} | "
                  f"ratio {p4['ours']['useful_tok_s'] / p4[who]['useful_tok_s']:.2f}x")


def peer(args) -> None:
    subprocess.run([sys.executable, str(PEER), "rung", args.name, args.ckpt, args.seq, args.batch], check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make"); m.add_argument("ckpt")
    mq = sub.add_parser("make-qwen", help="random Qwen2.5-7B shapes, for T4"); mq.add_argument("ckpt")
    o = sub.add_parser("ours"); o.add_argument("ckpt")
    o.add_argument("--method", default="lora"); o.add_argument("--seqs", default="2048")
    o.add_argument("--rows", type=int, default=1, help="rows per optimizer step")
    o.add_argument("--micro", default="auto"); o.add_argument("--checkpoint", default="auto")
    o.add_argument("--budget-gib", type=float, default=None); o.add_argument("--steps", type=int, default=5)
    o.add_argument("--optimizer", default="adamw"); o.add_argument("--plain", action="store_true")
    o.add_argument("--sync-debug", action="store_true", help="count the run's synchronizing CUDA calls by call site")
    o.add_argument("--profile", action="store_true", help="torch.profiler over the run: GPU busy share, time by kernel kind")
    o.add_argument("--peft-projections", action="store_true", help="peft's LoRA forward instead of loraflow/fused_lora.py")
    o.add_argument("--attention", default="auto", choices=["auto", "varlen"],
                   help="varlen: FA2 varlen even for equal rows (auto runs those through cuDNN)")
    o.add_argument("--offload-checkpoints", default="auto", choices=["auto", "true", "false"])
    o.add_argument("--embedding-on-cpu", default="auto", choices=["auto", "true", "false"])
    o.add_argument("--prompt-share", type=float, default=0.0, help="mask this share of each row's labels, as a prompt")
    o.add_argument("--whole-head", action="store_true", help="the head over every position (before fastpath.kept_logits)")
    o.add_argument("--fused-layers-min-tokens", type=int, default=None,
                   help="override memplan.FUSED_LAYERS_MIN_TOKENS (when Liger's per-layer kernels turn on)")
    r = sub.add_parser("peer"); r.add_argument("ckpt"); r.add_argument("name"); r.add_argument("seq"); r.add_argument("batch")
    s = sub.add_parser("summary"); s.add_argument("results")
    args = p.parse_args()
    {"make": lambda a: make(a.ckpt), "make-qwen": lambda a: save_random_qwen(a.ckpt), "ours": ours, "peer": peer, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    main()
