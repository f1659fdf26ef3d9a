"""Evaluation-time generation on a GPU: loraflow's batch-invariant loop (generate_ids_batch_invariant, decode step
in a CUDA graph) against HF `generate` one row at a time (the peer), on a random-init Llama-3.1-8B
architecture, in one run.

    python3 benchmarks/generate_bench.py [--rows 512] [--batch 128 256] [--peer-rows 4] [--out DIR] [--configs FILE]
    python3 benchmarks/generate_bench.py --bound-only      # the bound alone, on CPU

Prompts are random token ids with lengths drawn from a log-normal (median 150 tokens, clipped to
16..1024), as chat eval prompts are. Decoding is greedy with no EOS (random weights never emit one
reliably), so every row makes exactly --new-tokens tokens. Memory and speed do not depend on the
weight values. Prints tokens/s for each batch size (and the prefill's share), the peer's, their
ratio, how many rows our loop run one row at a time reproduces token for token in the batch, and the
workload's bound on this GPU (bound_seconds) with the share of it reached, and the peak GPU memory beside
the memory plan's figure for it (planned_gib).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from gpu_ladder import cfg as llama_8b  # noqa: E402  (the peers' Llama-3.1-8B config: one model for both)
from loraflow.generation import generate_ids_batch_invariant, generate_ids_hf  # noqa: E402


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.7 + torch.log(torch.tensor(150.0))).clamp(16, 1024).long()
    return [torch.randint(10, 128000, (int(L),), generator=g).tolist() for L in lengths]


# The rates used for the bound, by GPU: HBM bandwidth (spec) and the bf16 matmul rate the device notes
# give as reachable (H100 SXM and H200 share the dense spec of 989 TFLOP/s; they differ in HBM)
GPU_RATES = {"H200": (4.8e12, 790e12), "H100": (3.35e12, 790e12)}


def gpu_rates() -> tuple[float, float]:
    """(HBM bytes/s, matmul FLOP/s) of this GPU; the H200's where the GPU is neither."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "H200"
    return next((r for key, r in GPU_RATES.items() if key in name), GPU_RATES["H200"])


def bound_seconds(config, lengths: list[int], new_tokens: int, batch: int) -> dict:
    """The least time the workload can take on this GPU, whatever the software: prefill at the matmul
    rate (weights x prompt tokens, the lm_head at each prompt's last token, plus causal attention), then
    each decode step at the larger of its bytes (every weight once, plus each row's K/V so far) over the
    bandwidth and its FLOPs over the matmul rate. Rows go `batch` at a time, sorted by length, as the loop runs them."""
    from loraflow.memplan import Arch
    arch = Arch.from_config(config)
    hbm_bytes_per_s, matmul_flop_per_s = gpu_rates()
    head_params = arch.vocab * arch.hidden
    matmul_params = arch.linear_params() + head_params  # lm_head included
    kv_bytes_per_token = arch.layers * 2 * arch.kv_heads * arch.head_dim * 2
    # QK^T and PV over k keys for q queries
    attn_flops = lambda q, k: 4 * q * k * arch.heads * arch.head_dim * arch.layers  # noqa: E731
    # a prompt's logits are needed at its last token only
    prefill = sum(2 * arch.linear_params() * L + 2 * head_params + attn_flops(L, L) / 2
                  for L in lengths) / matmul_flop_per_s
    decode, order = 0.0, sorted(lengths)
    for first in range(0, len(order), batch):
        rows = order[first:first + batch]
        for step in range(1, new_tokens):
            keys = sum(L + step for L in rows)
            flops = 2 * matmul_params * len(rows) + attn_flops(1, keys)
            bytes_ = 2 * matmul_params + kv_bytes_per_token * keys
            decode += max(bytes_ / hbm_bytes_per_s, flops / matmul_flop_per_s)
    total = prefill + decode
    return {"prefill_s": round(prefill, 2), "decode_s": round(decode, 2), "seconds": round(total, 2),
            "tokens_per_s": round(len(lengths) * new_tokens / total, 1)}


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256])
    p.add_argument("--peer-rows", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--bound-only", action="store_true")
    p.add_argument("--profile", action="store_true", help="GPU time per decode step by kernel (eager, at the first batch size)")
    p.add_argument("--baseline", action="store_true", help="the loop as Run 7 had it (pointer-fed matmuls): for the A/B in one run")
    p.add_argument("--configs", help="matmul configurations by shape (invariant_kernel_probe.py --write), tried in place of "
                                     "the table in loraflow/invariant_kernels.py")
    a = p.parse_args()
    if a.bound_only:
        for b in a.batch:
            print(json.dumps({"batch": b, **bound_seconds(llama_8b(), list(map(len, prompts(a.rows))), a.new_tokens, b)}))
        return
    from loraflow import invariant_kernels as ik
    from loraflow.memplan import Arch, generation_bytes
    if a.baseline:  # as Run 7 measured it: the matmuls' tiles loaded by pointer, a program per tile
        ik.MATMUL_KERNEL = "pointer"
    if a.configs:
        ik.MM_BY_SHAPE.update({(kn, d, n, k): tuple(c) for kn, d, n, k, c in json.loads(Path(a.configs).read_text())})
    import transformers
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_8b()).eval()
    torch.set_default_dtype(torch.float32)
    rows = prompts(a.rows)
    kw = dict(pad_id=0, stop_ids=[], max_new_tokens=a.new_tokens)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
               "rows": a.rows, "new_tokens": a.new_tokens, "median_prompt_tokens": sorted(map(len, rows))[len(rows) // 2],
               "build_s": round(time.perf_counter() - t0, 1), "baseline": a.baseline,
               "matmul_kernel": ik.MATMUL_KERNEL, "configs": sorted(ik.MM_BY_SHAPE.items()), "ours": {}}
    batched_out, outputs, results["first_call_s"] = None, {}, {}
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    for b in a.batch:
        torch.cuda.reset_peak_memory_stats()
        try:
            # first call at this batch size: Triton compiles the kernels for its shapes (once per machine;
            # cached on disk after), kept out of the timed run
            _, results["first_call_s"][b] = timed(
                lambda: generate_ids_batch_invariant(model, rows[:b], batch_size=b, **{**kw, "max_new_tokens": 4}))
            out, s = timed(lambda: generate_ids_batch_invariant(model, rows, batch_size=b, **kw))
        except torch.OutOfMemoryError as e:
            print(json.dumps({"batch": b, "error": str(e)[:120]}), flush=True)
            torch.cuda.empty_cache()
            continue
        _, prefill_s = timed(lambda: generate_ids_batch_invariant(model, rows, batch_size=b, **{**kw, "max_new_tokens": 1}))
        batched_out = outputs[b] = out
        bound = bound_seconds(model.config, list(map(len, rows)), a.new_tokens, b)
        # the memory plan's figure for this batch (what evaluate sizes its batch by), beside the peak
        planned = weights + generation_bytes(Arch.from_config(model.config), b, list(map(len, rows)), a.new_tokens)
        results["ours"][b] = {"seconds": round(s, 2), "prefill_seconds": round(prefill_s, 2),
                              "tokens_per_s": round(a.rows * a.new_tokens / s, 1),
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                              "planned_gib": round(planned / 2**30, 2),
                              "bound": bound, "share_of_bound": round(bound["seconds"] / s, 3)}
        print(json.dumps({"batch": b, **results["ours"][b]}), flush=True)
    # every row, at every batch size: batch invariance means the same tokens
    ran = list(outputs)
    results["identical_across_batch_sizes"] = {f"{ran[0]} vs {b}": f"{same(outputs[ran[0]], outputs[b])}/{a.rows}" for b in ran[1:]}
    if a.profile:
        results["decode_step_profile"] = decode_step_profile(model, rows, a.batch[0])
    if a.peer_rows:
        one_row_runs(model, rows[:a.peer_rows], batched_out, kw, results)
    print(json.dumps(results, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "generate_bench.json").write_text(json.dumps(results, indent=1))


def decode_step_profile(model, rows: list[list[int]], batch: int, steps: int = 16) -> list[dict]:
    """GPU time per decode step by kernel, at `batch` rows: the loop run eagerly (no CUDA graph: the same
    kernels, each visible to the profiler) with steps + 1 new tokens, less the prefill-only run."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    kw = dict(pad_id=0, stop_ids=[], batch_size=batch, cuda_graph=False)
    by_kernel = []
    for new_tokens in (1, steps + 1):
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate_ids_batch_invariant(model, rows[:batch], max_new_tokens=new_tokens, **kw)
            torch.cuda.synchronize()
        by_kernel.append({e.key: (e.self_device_time_total, e.count) for e in prof.key_averages()
                          if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0})
    prefill, both = by_kernel
    # the prefill-only run too: its GPU time by kernel, against its wall time in the main figures
    top = sorted(prefill.items(), key=lambda kv: -kv[1][0])[:8]
    print(json.dumps({"prefill_gpu_ms": round(sum(t for t, _ in prefill.values()) / 1e3, 1), "rows": batch,
                      "top": [{"kernel": k[:90], "ms": round(t / 1e3, 1), "calls": n} for k, (t, n) in top]}), flush=True)
    per_step = [{"kernel": k[:90], "ms_per_step": round((t - prefill.get(k, (0, 0))[0]) / steps / 1e3, 4),
                 "calls_per_step": round((n - prefill.get(k, (0, 0))[1]) / steps, 1)} for k, (t, n) in both.items()]
    per_step = sorted((r for r in per_step if r["ms_per_step"] > 0), key=lambda r: -r["ms_per_step"])
    print(json.dumps({"decode_step_ms": round(sum(r["ms_per_step"] for r in per_step), 3), "batch": batch,
                      "kernels_per_step": round(sum(r["calls_per_step"] for r in per_step)), "top": per_step[:12]}), flush=True)
    return per_step


def one_row_runs(model, peer_rows, batched_out, kw, results) -> None:
    """Our loop and the peer (HF generate), one row at a time over the first rows."""
    # the same loop one row at a time: batch invariance means these equal the batched rows exactly
    alone, s = timed(lambda: [generate_ids_batch_invariant(model, [r], batch_size=1, **kw)[0] for r in peer_rows])
    results["ours_one_row_at_a_time"] = {"rows": len(peer_rows), "seconds": round(s, 2),
                                         "identical_to_batched": f"{same(alone, batched_out)}/{len(peer_rows)}",
                                         "first_differing_position": first_diff(alone, batched_out)}
    # the peer: plain HF generate, one row at a time (dynamic cache, sdpa, cuBLAS)
    peer_out, s = timed(lambda: [generate_ids_hf(model, [r], batch_size=1, **kw)[0] for r in peer_rows])
    results["peer_one_row_at_a_time"] = {"rows": len(peer_rows), "seconds": round(s, 2),
                                         "tokens_per_s": round(len(peer_rows) * kw["max_new_tokens"] / s, 1),
                                         "identical_to_ours": f"{same(peer_out, batched_out)}/{len(peer_rows)}",
                                         "first_differing_position": first_diff(peer_out, batched_out)}
    best = max(results["ours"].values(), key=lambda r: r["tokens_per_s"])
    results["ratio_vs_peer"] = round(best["tokens_per_s"] / results["peer_one_row_at_a_time"]["tokens_per_s"], 1)


def same(xs: list[dict], ys: list[dict]) -> int:
    return sum(x["ids"] == y["ids"] for x, y in zip(xs, ys))


def first_diff(xs: list[dict], ys: list[dict]) -> list[int | None]:
    return [next((k for k, (u, v) in enumerate(zip(x["ids"], y["ids"])) if u != v), None) for x, y in zip(xs, ys)]


if __name__ == "__main__":
    main()
