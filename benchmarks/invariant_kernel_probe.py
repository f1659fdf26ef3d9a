"""Times loraflow.invariant_kernels at the 8B's decode and prefill shapes against cuBLAS / sdpa, and
sweeps their configurations (H200). Prints one JSON line per measurement.

    python3 benchmarks/invariant_kernel_probe.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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


def main() -> None:
    bf = torch.bfloat16
    shapes = {"qo": (4096, 4096), "kv": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}
    configs = [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 3), (64, 128, 64, 8, 4, 4),
               (128, 64, 128, 8, 4, 3), (128, 32, 64, 8, 4, 4), (64, 32, 128, 8, 4, 4)]
    for M in (256, 16384):
        for name, (N, K) in shapes.items():
            if M == 16384 and name == "lm_head":
                continue
            a, w = torch.randn(M, K, dtype=bf, device="cuda"), torch.randn(N, K, dtype=bf, device="cuda") / 64
            t_cublas = ms(lambda: torch.nn.functional.linear(a, w))
            for cfg in configs:
                ik.MM_DECODE = cfg
                try:
                    t = ms(lambda: ik.matmul(a, w, decode=True))
                except Exception as e:  # a config that does not fit shared memory
                    print(json.dumps({"M": M, "op": name, "cfg": cfg, "error": str(e)[:80]}), flush=True)
                    continue
                print(json.dumps({"M": M, "op": name, "cfg": cfg, "ms": round(t, 4), "cublas_ms": round(t_cublas, 4),
                                  "tflops": round(2 * M * N * K / t / 1e9, 1), "gbps": round((N * K + M * K) * 2 / t / 1e6, 1)}), flush=True)
    # decode attention: batch 256, 8B heads, positions 150..450 in a cache of 1,300
    B, H, Hkv, D, cap = 256, 32, 8, 128, 1300
    q = torch.randn(B, 1, H, D, dtype=bf, device="cuda").transpose(1, 2)
    k, v = (torch.randn(B, Hkv, cap, D, dtype=bf, device="cuda") for _ in range(2))
    pos = torch.randint(150, 450, (B,), device="cuda")
    mask = torch.arange(cap, device="cuda")[None, None, None, :] <= pos[:, None, None, None]
    t_sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    for bn in (32, 64, 128):
        for warps in (2, 4, 8):
            ik.DECODE_BLOCK_N, ik.DECODE_WARPS = bn, warps
            t = ms(lambda: ik.attention(q, k, v, pos, D ** -0.5, decode=True))
            kv_bytes = 2 * B * Hkv * float(pos.float().mean() + 1) * D * 2
            print(json.dumps({"op": "decode_attention", "block_n": bn, "warps": warps, "ms": round(t, 4),
                              "sdpa_full_cache_ms": round(t_sdpa, 4), "gbps": round(kv_bytes / t / 1e6, 1)}), flush=True)
    x, g = torch.randn(256, 4096, dtype=bf, device="cuda"), torch.ones(4096, dtype=bf, device="cuda")
    print(json.dumps({"op": "rms_norm", "M": 256, "ms": round(ms(lambda: ik.rms_norm(x, g, 1e-5)), 4)}), flush=True)
    qp = torch.randn(16, 512, H, D, dtype=bf, device="cuda").transpose(1, 2)
    kp, vp = (torch.randn(16, Hkv, 512, D, dtype=bf, device="cuda") for _ in range(2))
    zero = torch.zeros(16, dtype=torch.long, device="cuda")
    t = ms(lambda: ik.attention(qp, kp, vp, zero, D ** -0.5, decode=False))
    t_ref = ms(lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True))
    print(json.dumps({"op": "prefill_attention", "B": 16, "L": 512, "ms": round(t, 4), "sdpa_ms": round(t_ref, 4)}), flush=True)


if __name__ == "__main__":
    main()
