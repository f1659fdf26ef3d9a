"""Do the CPU pins give the same bits on another processor? Run on two machines and compare.

    python benchmarks/cpu_determinism_probe.py [--json OUT]

For each MKL branch (the stages' pin COMPATIBLE, and AVX2, the previous pin) it computes, in a fresh
process with the stages' other pins (ATen at AVX2, oneDNN at AVX2, 2 threads): an fp32 GEMM of the
shapes the bundled model multiplies, a softmax and a layer norm of it, and a large sum. Inputs are
built from integers, so they are the same bits everywhere without trusting a random generator. It
prints the processor and one hash per quantity; equal hashes on an Intel and an AMD machine are
the evidence the README's determinism claim rests on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

PROBE = r"""
import hashlib, json, torch
def ints(rows, cols, salt):
    n = torch.arange(rows * cols, dtype=torch.int64)
    return (((n * 7919 + salt) % 2003).to(torch.float32) / 2003.0 - 0.5).reshape(rows, cols)
h = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
x, w = ints(16 * 64, 256, 1), ints(256, 688, 2)
y = x @ w
out = {"gemm": h(y), "softmax": h(torch.softmax(y, -1)), "layer_norm": h(torch.nn.functional.layer_norm(y, (688,))),
       "sum": h(ints(3000, 3000, 3).sum().reshape(1)), "threads": torch.get_num_threads(),
       "aten": torch.backends.cpu.get_cpu_capability()}
print(json.dumps(out))
"""


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(branch: str) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2",
           "MKL_CBWR": branch}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import torch
    result = {"cpu": cpu_name(), "torch": torch.__version__,
              "mkl": torch.backends.mkl.is_available() and torch.__config__.show().split("Math Kernel Library Version ")[-1].split(" ")[0],
              "branches": {b: run(b) for b in ("COMPATIBLE", "AVX2")}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
