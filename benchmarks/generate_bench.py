"""Evaluation-time generation on a GPU: loraflow's batched greedy path against HF `generate` one row
at a time (the peer), on a random-init Llama-3.1-8B architecture, in one run.

    python3 benchmarks/generate_bench.py [--rows 256] [--batch 64 128] [--peer-rows 8] [--out DIR]

Prompts are random token ids with lengths drawn from a log-normal (median 150 tokens, clipped to
16..1024), as chat eval prompts are. Decoding is greedy with no EOS (random weights never emit one
reliably), so every row makes exactly --new-tokens tokens. Memory and speed do not depend on the
weight values. Prints tokens/s for each batch size, the peer's, their ratio, and how many of the
peer's rows the batched path reproduced token for token.
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
from loraflow.generation import greedy_decode_static, greedy_generate_ids  # noqa: E402


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
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--peer-rows", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--static", action="store_true", help="static KV cache (compiled decode step), widths padded to 256")
    p.add_argument("--compiled", action="store_true", help="loraflow's own static-cache loop, decode step in a CUDA graph")
    a = p.parse_args()
    import transformers
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_8b()).eval()
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t0
    rows = prompts(a.rows)
    pad = 0
    if a.compiled:  # our decode loop: one static cache shape, the step compiled into a CUDA graph
        gen = lambda ps, b: greedy_decode_static(model, ps, pad_id=pad, eos_id=None, max_new_tokens=a.new_tokens, batch_size=b,
                                                 compile_step=True)
    else:
        gen = lambda ps, b: greedy_generate_ids(model, ps, pad_id=pad, eos_id=None, max_new_tokens=a.new_tokens, batch_size=b,
                                                static_cache=a.static, pad_to_multiple=256 if a.static else 1)
    if not a.compiled:
        gen(rows[:4], 4)  # warm-up: kernels, allocator
    if a.static or a.compiled:  # compile every shape the timed runs will use, outside the timing
        for b in a.batch:
            gen(rows, b)
    results = {"static_cache": a.static, "compiled_loop": a.compiled, "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
               "rows": a.rows, "new_tokens": a.new_tokens, "median_prompt_tokens": sorted(map(len, rows))[len(rows) // 2],
               "build_s": round(build_s, 1), "ours": {}}
    batched_out = None
    for b in a.batch:
        torch.cuda.reset_peak_memory_stats()
        out, s = timed(lambda: gen(rows, b))
        batched_out = out
        results["ours"][b] = {"seconds": round(s, 2), "tokens_per_s": round(a.rows * a.new_tokens / s, 1),
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(json.dumps({"batch": b, **results["ours"][b]}), flush=True)
    peer_rows = rows[:a.peer_rows]
    plain = lambda r: greedy_generate_ids(model, [r], pad_id=pad, eos_id=None, max_new_tokens=a.new_tokens, batch_size=1)[0]
    peer_out, s = timed(lambda: [plain(r) for r in peer_rows])  # the peer: plain HF generate, dynamic cache
    results["peer_one_row_at_a_time"] = {"rows": a.peer_rows, "seconds": round(s, 2),
                                         "tokens_per_s": round(a.peer_rows * a.new_tokens / s, 1)}
    same = sum(x["ids"] == y["ids"] for x, y in zip(peer_out, batched_out[:a.peer_rows]))
    first_diff = [next((k for k, (u, v) in enumerate(zip(x["ids"], y["ids"])) if u != v), None)
                  for x, y in zip(peer_out, batched_out[:a.peer_rows])]
    results["identical_to_one_at_a_time"] = f"{same}/{a.peer_rows}"
    results["first_differing_position"] = first_diff
    best = max(results["ours"].values(), key=lambda r: r["tokens_per_s"])
    results["ratio_vs_peer"] = round(best["tokens_per_s"] / results["peer_one_row_at_a_time"]["tokens_per_s"], 1)
    print(json.dumps(results, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "generate_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
