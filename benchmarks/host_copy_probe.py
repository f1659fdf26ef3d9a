"""Host <-> GPU copy rates that activation offloading lives on, and what they cost the matmuls.

A layer whose saved activations wait in pinned CPU memory needs them copied out in forward and back
in backward while the GPU computes. Whether that beats recomputing the layer depends on the link's
rate in each direction, on whether both directions run at once (two copy engines), and on how much
the copies slow the GEMMs they overlap (they share the GPU's memory). This measures all of it:
    python3 benchmarks/host_copy_probe.py [--gib 2]
One JSON line per measurement: GB/s for copies, TFLOP/s for the GEMM loop. Last, the input embedding
kept in CPU memory (QLoRA under a tight budget): the GPU's own gather of an 8B micro-batch's rows from
the pinned table (loraflow.host_rows), against the old path (ids to the host, CPU gather, copy back).
"""
from __future__ import annotations

import argparse
import json

import torch


def _timed(fn, streams, reps: int = 5) -> float:
    """Seconds per repetition of fn(), with the work queued on `streams`, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for s in streams:
        s.wait_event(start)
    for _ in range(reps):
        fn()
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    args = parser.parse_args()
    n = int(args.gib * 2**30) // 2
    host_out = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    host_in = torch.randn(n, dtype=torch.float32).to(torch.bfloat16).pin_memory()
    gpu_src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    gpu_dst = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    d2h, h2d = torch.cuda.Stream(), torch.cuda.Stream()
    nbytes = n * 2
    a = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    flop = 2 * 16384 * 4096 * 14336

    def copy_out():
        with torch.cuda.stream(d2h):
            host_out.copy_(gpu_src, non_blocking=True)

    def copy_in():
        with torch.cuda.stream(h2d):
            gpu_dst.copy_(host_in, non_blocking=True)

    def gemms(k: int = 40):
        for _ in range(k):
            torch.mm(a, w.t())

    def emit(**kv):
        print(json.dumps(kv), flush=True)

    emit(device=torch.cuda.get_device_name(), torch=torch.__version__, gib=args.gib)
    emit(what="device to host alone", gb_s=round(nbytes / _timed(copy_out, [d2h]) / 1e9, 1))
    emit(what="host to device alone", gb_s=round(nbytes / _timed(copy_in, [h2d]) / 1e9, 1))
    both = _timed(lambda: (copy_out(), copy_in()), [d2h, h2d])
    emit(what="both directions at once", gb_s_each=round(nbytes / both / 1e9, 1))
    alone = _timed(gemms, [])
    emit(what="gemm 16384x4096x14336 alone", tflop_s=round(40 * flop / alone / 1e12, 1))
    # one copy each way beside the GEMM loop, each stream timed to its own end: whether the copies
    # slow down under the GEMMs, the GEMMs under the copies, or neither
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    ends = {name: torch.cuda.Event(enable_timing=True) for name in ("out", "in", "gemm")}
    start.record()
    for stream, copy, name in ((d2h, copy_out, "out"), (h2d, copy_in, "in")):
        stream.wait_event(start)
        copy()
        ends[name].record(stream)
    gemms()
    ends["gemm"].record()
    torch.cuda.synchronize()
    took = {name: start.elapsed_time(e) / 1e3 for name, e in ends.items()}
    emit(what="both copies beside the GEMM loop",
         device_to_host_gb_s=round(nbytes / took["out"] / 1e9, 1),
         host_to_device_gb_s=round(nbytes / took["in"] / 1e9, 1),
         gemm_tflop_s=round(40 * flop / took["gemm"] / 1e12, 1), gemm_alone_tflop_s=round(40 * flop / alone / 1e12, 1),
         gemm_seconds=round(took["gemm"], 4), gemm_alone_seconds=round(alone, 4),
         copy_seconds=round(max(took["out"], took["in"]), 4))
    embedding_gather(emit)


def embedding_gather(emit, vocab: int = 128256, hidden: int = 4096, tokens: int = 8192) -> None:
    """One micro-batch's lookup (T3: 4 x 2048 tokens) in Llama-3.1-8B's embedding kept pinned in CPU
    memory, by the GPU's gather and by the CPU path it replaced; the GB/s counts the rows' bytes."""
    from loraflow import host_rows
    table = torch.randn(vocab, hidden, dtype=torch.bfloat16).pin_memory()
    ids = torch.randint(0, vocab, (tokens,), device="cuda")
    gathered = _timed(lambda: host_rows.gather(table, ids), [])
    cpu_path = _timed(lambda: table[ids.cpu()].to("cuda"), [])
    assert torch.equal(host_rows.gather(table, ids).cpu(), table[ids.cpu()])
    rows_bytes = tokens * hidden * 2
    emit(what=f"embedding lookup, {tokens} ids from a pinned {vocab}x{hidden} bf16 table",
         gpu_gather_ms=round(gathered * 1e3, 3), gpu_gather_gb_s=round(rows_bytes / gathered / 1e9, 1),
         cpu_path_ms=round(cpu_path * 1e3, 3), speedup=round(cpu_path / gathered, 1))


if __name__ == "__main__":
    main()
