"""The 8-bit AdamW step alone on the GPU: bitsandbytes' AdamW (one launch and one synchronize per
tensor) against loraflow's FlatAdamW8bit, on the LoRA tensors of Llama-3.1-8B (r=16, all 7
projections, 32 layers: 448 fp32 tensors). Checks that both write the same bytes into every weight
and state, and times a step (median of 20, after 3). One JSON line.
python benchmarks/optim8bit_probe.py"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bitsandbytes as bnb  # noqa: E402

from loraflow.flat_adamw8bit import FlatAdamW8bit  # noqa: E402

HIDDEN, KV, INTER, LAYERS, RANK = 4096, 1024, 14336, 32, 16
PROJECTIONS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
               "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}


def lora_tensors():
    torch.manual_seed(0)
    shapes = [s for _ in range(LAYERS) for fan_in, fan_out in PROJECTIONS.values()
              for s in ((RANK, fan_in), (fan_out, RANK))]
    return [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.01) for s in shapes]


def timed(cls, steps=23):
    params = lora_tensors()
    optimizer = cls(params, lr=2e-4, weight_decay=0.0, optim_bits=8)
    times = []
    for step in range(steps):
        g = torch.Generator(device="cuda").manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return params, optimizer, statistics.median(times[3:])


def main():
    ref_params, ref, ref_s = timed(bnb.optim.AdamW)
    params, flat, flat_s = timed(FlatAdamW8bit)
    same_weights = all(torch.equal(a, b) for a, b in zip(params, ref_params))
    same_states = all(torch.equal(flat.state[a][k], ref.state[b][k]) for a, b in zip(params, ref_params)
                      for k in ("state1", "state2", "absmax1", "absmax2"))
    print(json.dumps({"probe": "optim8bit", "device": torch.cuda.get_device_name(), "tensors": len(params),
                      "values": sum(p.numel() for p in params), "bitsandbytes_step_ms": round(ref_s * 1e3, 2),
                      "flat_step_ms": round(flat_s * 1e3, 2), "same_weights": same_weights,
                      "same_states": same_states, "bitsandbytes": bnb.__version__}))


if __name__ == "__main__":
    main()
