"""Times loraflow.invariant_kernels at the 8B's decode and prefill shapes against cuBLAS / sdpa, and
sweeps their configurations (H200). Prints one JSON line per measurement and the fastest per shape.

    python3 benchmarks/invariant_kernel_probe.py [--decode-m 256 512] [--write configs.json] [--matmul-only | --attention-only]
        [--kernels tma pointer]
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loraflow import invariant_kernels as ik  # noqa: E402


def ms(fn, reps: int = 20) -> float:
    """GPU time per call, replayed from a CUDA graph as the decode loop runs it (no launch cost)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


POINTER_DECODE = [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 3), (64, 128, 64, 8, 4, 4),
                  (128, 64, 128, 8, 4, 3), (128, 32, 64, 8, 4, 4), (64, 32, 128, 8, 4, 4), (128, 256, 64, 8, 8, 3),
                  (128, 128, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3), (64, 128, 128, 8, 4, 3), (64, 256, 64, 8, 8, 3),
                  (256, 64, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3)]
POINTER_PREFILL = [(128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
                   (128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3)]
# the 8B's weights as the generation loop calls them: q/k/v and gate/up as one launch each (matmul_group)
SHAPES = {"qkv": (4096 + 2 * 1024, 4096), "o": (4096, 4096), "gate_up": (2 * 14336, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def time_configs(name: str, N: int, K: int, Ms: list[int], configs: list, run, **tag) -> dict:
    """Each configuration's time at each M beside cuBLAS, a JSON line each (tagged with `tag`); returns
    {config: ms summed over Ms}, infinite for one that fails (shared memory, this Triton's features).
    run(a, w, config) computes a @ w.T with that configuration."""
    bf, totals = torch.bfloat16, {}
    w = torch.randn(N, K, dtype=bf, device="cuda") / 64
    for M in Ms:
        a = torch.randn(M, K, dtype=bf, device="cuda")
        t_cublas = ms(lambda: torch.nn.functional.linear(a, w))
        for cfg in configs:
            try:
                t = ms(lambda: run(a, w, cfg))
            except Exception as e:
                print(json.dumps({**tag, "M": M, "op": name, "cfg": cfg, "error": str(e)[:120]}), flush=True)
                totals[cfg] = float("inf")
                continue
            totals[cfg] = totals.get(cfg, 0.0) + t
            print(json.dumps({**tag, "M": M, "op": name, "cfg": cfg, "ms": round(t, 4), "cublas_ms": round(t_cublas, 4),
                              "tflops": round(2 * M * N * K / t / 1e9, 1)}), flush=True)
    return totals


# the persistent TMA kernel's shared memory holds `stages` A and W tiles plus the output tile: 128 x 256 at
# four stages does not fit
TMA_CONFIGS = [(128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (64, 128, 64, 8, 4, 4),
               (256, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 256, 64, 8, 4, 3), (128, 128, 64, 8, 4, 4)]
CONFIGS = {("pointer", True): POINTER_DECODE, ("pointer", False): POINTER_PREFILL,
           ("tma", True): TMA_CONFIGS, ("tma", False): TMA_CONFIGS}


def sweep(kernel: str, decode_ms: list[int], prefill_m: int) -> list:
    """Every configuration of one kernel at every shape; returns the fastest per (phase, N, K), decode
    summed over decode_ms (the batch sizes the loop will run), as [kernel, decode, N, K, config] rows."""
    best = []
    ik.MATMUL_KERNEL = kernel
    for decode, ms_ in ((True, decode_ms), (False, [prefill_m])):
        for name, (N, K) in SHAPES.items():
            if not decode and name == "lm_head":  # prefill's lm_head sees one row per prompt
                continue

            def run(a, w, cfg):
                ik.MM_BY_SHAPE[(kernel, decode, N, K)] = cfg
                return ik.matmul(a, w, decode=decode)
            totals = time_configs(name, N, K, ms_, CONFIGS[kernel, decode], run, kernel=kernel)
            pick = min(totals, key=totals.get)
            ik.MM_BY_SHAPE[(kernel, decode, N, K)] = pick
            best.append([kernel, decode, N, K, list(pick)])
            print(json.dumps({"best": name, "kernel": kernel, "decode": decode, "cfg": pick,
                              "ms_summed": round(totals[pick], 4)}), flush=True)
    ik.MATMUL_KERNEL = "auto"
    return best


def main() -> None:
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--write", help="write the fastest configuration per shape here (generate_bench.py --configs)")
    p.add_argument("--decode-m", type=int, nargs="+", default=[256])
    p.add_argument("--matmul-only", action="store_true")
    p.add_argument("--attention-only", action="store_true", help="no matmul sweep")
    p.add_argument("--kernels", nargs="+", default=["tma", "pointer"], choices=["tma", "pointer"])
    a = p.parse_args()
    best = [] if a.attention_only else [row for kernel in a.kernels for row in sweep(kernel, a.decode_m, 16384)]
    if a.write:
        Path(a.write).write_text(json.dumps(best))
    if a.matmul_only:
        return
    bf = torch.bfloat16
    # decode attention: batch 256, 8B heads, positions 150..450, each row given 1,300 slots (so SDPA can
    # read the pool as a padded batch)
    B, H, Hkv, D, cap = 256, 32, 8, 128, 1300
    q = torch.randn(B, 1, H, D, dtype=bf, device="cuda").transpose(1, 2)
    k, v = (torch.randn(Hkv, B * cap, D, dtype=bf, device="cuda") for _ in range(2))
    starts = torch.arange(B, device="cuda") * cap
    pos = torch.randint(150, 450, (B,), device="cuda")
    mask = torch.arange(cap, device="cuda")[None, None, None, :] <= pos[:, None, None, None]
    k_rows, v_rows = (t.view(Hkv, B, cap, D).transpose(0, 1) for t in (k, v))
    t_sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k_rows, v_rows, attn_mask=mask,
                                                                         enable_gqa=True))
    chosen = ik.DECODE_BLOCK_N, ik.DECODE_WARPS, ik.DECODE_STAGES
    t = ms(lambda: ik.decode_attention(q, k, v, starts, pos, D ** -0.5))
    kv_bytes = 2 * B * Hkv * float(pos.float().mean() + 1) * D * 2
    print(json.dumps({"op": "decode_attention", "chosen": chosen, "ms": round(t, 4), "sdpa_full_cache_ms": round(t_sdpa, 4),
                      "gbps": round(kv_bytes / t / 1e6, 1)}), flush=True)
    # decode attention at the workload's own lengths (generate_bench's prompts, sorted as the loop sorts
    # them, halfway through the 256 new tokens, each row's slots as the loop places them), every
    # configuration: the spread of lengths is what leaves a tail of long rows
    from generate_bench import prompts
    lengths = sorted(map(len, prompts(512)))
    for rows in (256, 512):
        row_lengths = torch.tensor(lengths[-rows:], device="cuda")
        pos, starts = row_lengths + 128, torch.cumsum(row_lengths + 256, 0) - (row_lengths + 256)
        kw, vw = (torch.randn(Hkv, int((row_lengths + 256).sum()), D, dtype=bf, device="cuda") for _ in range(2))
        qw = torch.randn(rows, 1, H, D, dtype=bf, device="cuda").transpose(1, 2)
        kv_bytes = 2 * Hkv * float((pos + 1).sum()) * D * 2
        timings = []
        for bn, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            ik.DECODE_BLOCK_N, ik.DECODE_WARPS, ik.DECODE_STAGES = bn, warps, stages
            timings.append((ms(lambda: ik.decode_attention(qw, kw, vw, starts, pos, D ** -0.5)), bn, warps, stages))
        ik.DECODE_BLOCK_N, ik.DECODE_WARPS, ik.DECODE_STAGES = chosen
        t_chosen = next(t for t, *cfg in timings if tuple(cfg) == chosen)
        t_best, *best = min(timings)
        print(json.dumps({"op": "decode_attention_workload", "rows": rows, "chosen": chosen, "ms": round(t_chosen, 4),
                          "gbps": round(kv_bytes / t_chosen / 1e6, 1), "best": best, "best_ms": round(t_best, 4),
                          "best_gbps": round(kv_bytes / t_best / 1e6, 1)}), flush=True)
    x, g = torch.randn(256, 4096, dtype=bf, device="cuda"), torch.ones(4096, dtype=bf, device="cuda")
    print(json.dumps({"op": "rms_norm", "M": 256, "ms": round(ms(lambda: ik.rms_norm(x, g, 1e-5)), 4)}), flush=True)
    # prefill attention: 16 rows of 512 packed into one sequence, against SDPA's causal kernel on the 16 rows
    qp = torch.randn(1, 16 * 512, H, D, dtype=bf, device="cuda").transpose(1, 2)
    kp, vp = (torch.randn(Hkv, 16 * 512, D, dtype=bf, device="cuda") for _ in range(2))
    blocks = ik.prefill_blocks([(512 * r, 512 * r, 512) for r in range(16)], "cuda")
    t = ms(lambda: ik.prefill_attention(qp, kp, vp, blocks, D ** -0.5))
    q_rows = qp.reshape(H, 16, 512, D).transpose(0, 1)
    k_rows, v_rows = (t.view(Hkv, 16, 512, D).transpose(0, 1) for t in (kp, vp))
    t_ref = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q_rows, k_rows, v_rows, is_causal=True,
                                                                        enable_gqa=True))
    print(json.dumps({"op": "prefill_attention", "B": 16, "L": 512, "ms": round(t, 4), "sdpa_ms": round(t_ref, 4)}), flush=True)


if __name__ == "__main__":
    main()
