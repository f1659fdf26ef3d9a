"""Attention's share of a LoRA step on a GPU, by backend: PyTorch's FlashAttention-2 varlen (what
loraflow's packed attention calls) and SDPA's flash and cuDNN kernels on the dense batch (GQA
expanded). cuDNN's varlen entry point (aten._cudnn_attention_backward) failed on torch 2.11
(results/train-h200-unsloth.md). Forward + backward of one Llama-3.1-8B layer's attention (32 heads,
8 KV heads, head dim 128) over ROWS rows of SEQ tokens; median of 20 after warm-up.

    python benchmarks/attention_probe.py [SEQ] [ROWS]      # one JSON line per backend
"""
import json
import sys

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(seq=2048, rows=8, heads=32, kv=8, d=128):
    total = seq * rows
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(total, kv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(total, kv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    dout = torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.arange(0, total + 1, seq, device="cuda", dtype=torch.int32)
    flops = 4 * rows * seq * seq * heads * d / 2 * 3.5  # causal; backward ~2.5x forward
    results = {}

    def fa2():
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, seq, seq, 0.0, True, False)[0]
        out.backward(dout)
        return out

    def dense(backend):
        def run():
            qd, kd, vd = (t.view(rows, seq, -1, d).transpose(1, 2) for t in (q, k, v))
            kd, vd = kd.repeat_interleave(heads // kv, 1), vd.repeat_interleave(heads // kv, 1)
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            out.transpose(1, 2).reshape(total, heads, d).backward(dout)
            return out
        return run

    def cudnn_gqa():  # loraflow's path for equal rows: KV heads grouped, nothing expanded
        from loraflow import fastpath
        packed = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, heads, total, d)
        out = fastpath.dense_rows_attention(*packed, rows, None, fastpath.CUDNN)[0]
        out.backward(dout)
        return out

    ref = fa2().float()
    for name, fn in (("fa2_varlen", fa2), ("sdpa_flash_dense", dense(SDPBackend.FLASH_ATTENTION)),
                     ("sdpa_cudnn_dense", dense(SDPBackend.CUDNN_ATTENTION)), ("loraflow_cudnn_gqa", cudnn_gqa)):
        try:
            out = fn().float()
            if out.dim() == 4:
                out = out.transpose(1, 2).reshape(total, heads, d)
            err = float((out.detach() - ref.detach()).norm() / ref.detach().norm())
            ms = timed(fn)
            results[name] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "rel_err_vs_fa2": round(err, 5)}
        except Exception as e:  # a backend this torch or GPU lacks
            results[name] = {"error": str(e).splitlines()[0][:200]}
    print(json.dumps({"probe": "attention", "seq": seq, "rows": rows, "torch": torch.__version__, **results}), flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
