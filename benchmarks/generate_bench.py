"""Evaluation-time generation on a GPU: loraflow's batch-invariant loop (generate_ids_batch_invariant, decode step
in a CUDA graph) against HF `generate` one row at a time (the peer), on a random-init Llama-3.1-8B
architecture, in one run.

    python3 benchmarks/generate_bench.py [--rows 512] [--batch 128 256] [--peer-rows 4] [--out DIR]

Prompts are random token ids with lengths drawn from a log-normal (median 150 tokens, clipped to
16..1024), as chat eval prompts are. Decoding is greedy with no EOS (random weights never emit one
reliably), so every row makes exactly --new-tokens tokens. Memory and speed do not depend on the
weight values. Prints tokens/s for each batch size (and the prefill's share), the peer's, their
ratio, and how many rows our loop run one row at a time reproduces token for token in the batch.
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
    a = p.parse_args()
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
               "build_s": round(time.perf_counter() - t0, 1), "ours": {}}
    # first call: Triton compiles the kernels (once per machine; cached on disk after)
    _, results["first_call_s"] = timed(lambda: generate_ids_batch_invariant(model, rows[:8], batch_size=8, **{**kw, "max_new_tokens": 4}))
    batched_out, outputs = None, {}
    for b in a.batch:
        torch.cuda.reset_peak_memory_stats()
        out, s = timed(lambda: generate_ids_batch_invariant(model, rows, batch_size=b, **kw))
        _, prefill_s = timed(lambda: generate_ids_batch_invariant(model, rows, batch_size=b, **{**kw, "max_new_tokens": 1}))
        batched_out = outputs[b] = out
        results["ours"][b] = {"seconds": round(s, 2), "prefill_seconds": round(prefill_s, 2),
                              "tokens_per_s": round(a.rows * a.new_tokens / s, 1),
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(json.dumps({"batch": b, **results["ours"][b]}), flush=True)
    # every row, at every batch size: batch invariance means the same tokens
    first = outputs[a.batch[0]]
    results["identical_across_batch_sizes"] = {f"{a.batch[0]} vs {b}": f"{same(first, outputs[b])}/{a.rows}" for b in a.batch[1:]}
    peer_rows = rows[:a.peer_rows]
    # the same loop one row at a time: batch invariance means these equal the batched rows exactly
    alone, s = timed(lambda: [generate_ids_batch_invariant(model, [r], batch_size=1, **kw)[0] for r in peer_rows])
    results["ours_one_row_at_a_time"] = {"rows": a.peer_rows, "seconds": round(s, 2),
                                         "identical_to_batched": f"{same(alone, batched_out)}/{a.peer_rows}",
                                         "first_differing_position": first_diff(alone, batched_out)}
    # the peer: plain HF generate, one row at a time (dynamic cache, sdpa, cuBLAS)
    peer_out, s = timed(lambda: [generate_ids_hf(model, [r], batch_size=1, **kw)[0] for r in peer_rows])
    results["peer_one_row_at_a_time"] = {"rows": a.peer_rows, "seconds": round(s, 2),
                                         "tokens_per_s": round(a.peer_rows * a.new_tokens / s, 1),
                                         "identical_to_ours": f"{same(peer_out, batched_out)}/{a.peer_rows}",
                                         "first_differing_position": first_diff(peer_out, batched_out)}
    best = max(results["ours"].values(), key=lambda r: r["tokens_per_s"])
    results["ratio_vs_peer"] = round(best["tokens_per_s"] / results["peer_one_row_at_a_time"]["tokens_per_s"], 1)
    print(json.dumps(results, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "generate_bench.json").write_text(json.dumps(results, indent=1))


def same(xs: list[dict], ys: list[dict]) -> int:
    return sum(x["ids"] == y["ids"] for x, y in zip(xs, ys))


def first_diff(xs: list[dict], ys: list[dict]) -> list[int | None]:
    return [next((k for k, (u, v) in enumerate(zip(x["ids"], y["ids"])) if u != v), None) for x, y in zip(xs, ys)]


if __name__ == "__main__":
    main()
