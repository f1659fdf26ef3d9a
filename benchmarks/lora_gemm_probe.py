"""The LoRA matrices' own GEMMs in a step, timed alone as loraflow/fused_lora.py runs them, against the
memory they must move and against the same products written the other way round.

The low-rank GEMMs do almost no arithmetic (rank 16) but each reads a whole tokens x width tensor, so
their floor is the bytes over the GPU's memory rate. Run 10's H200 profile of T1 showed a split-K
kernel once per layer at 727 us, so one of a layer's four grad_A products; the largest, down_proj's
(16 x 16,384 x 14,336), reads its input once in about 100 us. Each product here is timed both ways (grad_A as
dy_b^T x or as (x^T dy_b)^T, grad_B as dy^T xa or as (xa^T dy)^T), and each beta=1 base GEMM (the
epilogue that adds onto the LoRA term) against the same GEMM with beta=0, for Llama-3.1-8B's layer:

    python benchmarks/lora_gemm_probe.py [--tokens 16384 8192] [--rank 16]   # one JSON line a token count

Each line gives, per group of projections and summed over the 32 layers of a step: ms as the step
runs them, ms with the faster form of each, and the memory floor (bytes read and written over the
rate of a large device copy measured in the same run).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.attention_probe import timed as median_ms  # noqa: E402  (median of CUDA-event timings)
from benchmarks.gemm_floor_probe import HIDDEN, INTER, KV, LAYERS  # noqa: E402

# groups of fused_lora: (input width, output widths of the projections that share the input)
GROUPS = {"qkv": (HIDDEN, (HIDDEN, KV, KV)), "o": (HIDDEN, (HIDDEN,)), "gate_up": (HIDDEN, (INTER, INTER)),
          "down": (INTER, (HIDDEN,))}


def copy_rate() -> float:
    """Bytes a second of a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (median_ms(lambda: dst.copy_(src)) / 1e3)


def group_times(tokens: int, width: int, outs: tuple, rank: int, rate: float) -> dict:
    """ms of each LoRA product of one group (forward and backward), both forms, and their memory floor."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02

    n = len(outs)
    flat, a_all = rand(tokens, width), rand(n * rank, width)
    xa, dy_b_all = rand(tokens, n * rank), rand(tokens, n * rank)
    grad_x = rand(tokens, width)
    rows = {}

    def put(name, current, other, nbytes):
        rows[name] = {"current_ms": round(current, 4), "other_ms": round(other, 4) if other else None,
                      "floor_ms": round(nbytes / rate * 1e3, 4)}

    b2 = 2  # bytes of a bf16 value
    put("fwd x@A", median_ms(lambda: flat @ a_all.t()), None, b2 * tokens * (width + n * rank))
    put("bwd grad_A", median_ms(lambda: dy_b_all.t() @ flat), median_ms(lambda: (flat.t() @ dy_b_all).t()),
        b2 * tokens * (width + n * rank))
    put("bwd grad_x += dy_b A", median_ms(lambda: grad_x.addmm_(dy_b_all, a_all)), None,
        b2 * tokens * (2 * width + n * rank))
    for i, out in enumerate(outs):
        dy, b, w = rand(tokens, out), rand(out, rank), rand(out, width)
        update = xa[:, i * rank:(i + 1) * rank]
        y = torch.empty(tokens, out, device="cuda", dtype=torch.bfloat16)
        put(f"fwd[{i}] xa@B", median_ms(lambda: update @ b.t()), None, b2 * tokens * (rank + out))
        put(f"fwd[{i}] base onto it (beta=1)", median_ms(lambda: y.addmm_(flat, w.t())),
            median_ms(lambda: torch.mm(flat, w.t(), out=y)), b2 * tokens * (width + 2 * out))
        put(f"bwd[{i}] dy@B", median_ms(lambda: dy @ b), None, b2 * tokens * (out + rank))
        put(f"bwd[{i}] grad_B", median_ms(lambda: dy.t() @ update), median_ms(lambda: (update.t() @ dy).t()),
            b2 * tokens * (out + rank))
        if i:
            put(f"bwd[{i}] base grad_x (beta=1)", median_ms(lambda: grad_x.addmm_(dy, w)),
                median_ms(lambda: torch.mm(dy, w, out=grad_x)), b2 * tokens * (out + 2 * width))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 8192])
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    rate = copy_rate()
    for tokens in args.tokens:
        groups = {name: group_times(tokens, width, outs, args.rank, rate) for name, (width, outs) in GROUPS.items()}
        # beta=1 rows: the base GEMM is in the GEMM floor; only its epilogue's extra time counts here
        lora = [r for grp in groups.values() for name, r in grp.items() if "base" not in name]
        now = sum(r["current_ms"] for r in lora)
        best = sum(min(r["current_ms"], r["other_ms"] or r["current_ms"]) for r in lora)
        floor = sum(r["floor_ms"] for r in lora)
        epilogue = sum(r["current_ms"] - r["other_ms"] for grp in groups.values()
                       for name, r in grp.items() if "base" in name)
        print(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": tokens,
            "rank": args.rank, "copy_gb_s": round(rate / 1e9, 1),
            "lora_gemms_step_ms": round(LAYERS * now, 1), "with_faster_forms_step_ms": round(LAYERS * best, 1),
            "memory_floor_step_ms": round(LAYERS * floor, 1),
            "beta1_epilogues_extra_step_ms": round(LAYERS * epilogue, 1), "groups": groups}), flush=True)


if __name__ == "__main__":
    main()
