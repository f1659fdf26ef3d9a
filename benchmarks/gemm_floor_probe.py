"""The GEMM floor of a LoRA step without checkpointing (issue 18's T1): every frozen-weight GEMM of
Llama-3.1-8B's step, timed alone by shape on this GPU. A LoRA step runs each projection forward and
once more for the input's gradient (frozen weights need no weight gradient), and the head the same
(Liger's fused cross-entropy, in chunks of rows). The sum is what the step's GEMMs cost at cuBLAS's
own rate for these shapes, before attention, norms, the LoRA matrices or any idle time: a floor
under the step that no change outside the GEMMs can go below.

It also times the projections that read one input stacked into one GEMM (q/k/v: 6144 outputs,
gate/up: 28,672), which would need the base weights stored side by side, and Liger's fused linear
cross-entropy (the head, as the step runs it) at its default chunk of rows and at larger ones, to say
what each would be worth.

    python benchmarks/gemm_floor_probe.py [--tokens 16384] [--peer-tok-s 16195]   # one JSON line

With --peer-tok-s (Unsloth's rate in the same run) it states the step time 1.15x the peer needs and
how much of it the GEMM floor leaves for everything else.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.attention_probe import timed as median_ms  # noqa: E402  (median of CUDA-event timings)

HIDDEN, KV, INTER, LAYERS, VOCAB = 4096, 1024, 14336, 32, 128256
# (input width, output width) of each frozen projection of one decoder layer
PROJECTIONS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
               "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}
STACKED = {"qkv": (HIDDEN, HIDDEN + 2 * KV), "o": (HIDDEN, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
           "down": (INTER, HIDDEN)}


def liger_chunk_rows(tokens: int) -> int:
    """The rows of one chunk of Liger's fused cross-entropy at its default chunk_mem_const of 1
    (its own formula: logits no larger than the hidden states): 512 at 16k tokens and a 128k vocabulary."""
    per_hidden = -(-VOCAB // HIDDEN)
    return min(tokens, 1 << (-(-tokens // per_hidden) - 1).bit_length())


def forward_and_input_grad_ms(tokens: int, fan_in: int, fan_out: int) -> dict:
    """x W^T and dY W for one frozen projection, each timed alone."""
    x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
    flop = 2 * tokens * fan_in * fan_out
    fwd, bwd = median_ms(lambda: x @ w.t()), median_ms(lambda: dy @ w)
    return {"forward_ms": round(fwd, 4), "input_grad_ms": round(bwd, 4),
            "tflops": round(2 * flop / (fwd + bwd) / 1e9, 1)}


def layer_ms(tokens: int, shapes: dict) -> tuple[float, dict]:
    per = {name: forward_and_input_grad_ms(tokens, *shape) for name, shape in shapes.items()}
    return sum(p["forward_ms"] + p["input_grad_ms"] for p in per.values()), per


def liger_head_ms(tokens: int) -> dict:
    """Liger's fused linear cross-entropy on the head (frozen weight; it computes the input's
    gradient inside its forward), by chunk_mem_const: 1 is its default (`liger_chunk_rows`)."""
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    target = torch.randint(0, VOCAB, (tokens,), device="cuda")
    return {str(c): round(median_ms(lambda: fused_linear_cross_entropy_forward(x, w, target, chunk_mem_const=c)), 3)
            for c in (1, 2, 4, 8)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--peer-tok-s", type=float, default=None)
    args = ap.parse_args()
    tokens = args.tokens
    separate_ms, separate = layer_ms(tokens, PROJECTIONS)
    stacked_ms, stacked = layer_ms(tokens, STACKED)
    chunk_rows = liger_chunk_rows(tokens)
    head = forward_and_input_grad_ms(chunk_rows, HIDDEN, VOCAB)
    head_ms = (head["forward_ms"] + head["input_grad_ms"]) * tokens / chunk_rows
    big = forward_and_input_grad_ms(8192, 8192, 8192)  # the GPU's rate on a large square GEMM
    step_flop = 2 * 2 * tokens * (LAYERS * sum(i * o for i, o in PROJECTIONS.values()) + HIDDEN * VOCAB)
    floor_ms = LAYERS * separate_ms + head_ms
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": tokens,
        "layer_ms": round(separate_ms, 3), "layer_stacked_ms": round(stacked_ms, 3),
        "head_ms": round(head_ms, 2), "step_gemm_floor_ms": round(floor_ms, 1),
        "step_gemm_floor_stacked_ms": round(LAYERS * stacked_ms + head_ms, 1),
        "floor_tflops": round(step_flop / floor_ms / 1e9, 1), "square_8192_tflops": big["tflops"],
        "by_projection": separate, "stacked": stacked, "head_chunk_rows": chunk_rows, "head_chunk": head,
    }
    try:
        result["liger_head_ms_by_chunk_mem_const"] = liger_head_ms(tokens)
    except Exception as error:  # noqa: BLE001 -- the GEMM figures stand without it
        result["liger_head_error"] = repr(error)[:200]
    if args.peer_tok_s:
        goal_ms = tokens / (1.15 * args.peer_tok_s) * 1e3
        result.update(peer_tok_s=args.peer_tok_s, step_ms_for_1_15x=round(goal_ms, 1),
                      left_beside_gemm_floor_ms=round(goal_ms - floor_ms, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
