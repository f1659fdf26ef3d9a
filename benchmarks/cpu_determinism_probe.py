"""Do the CPU pins give the same bits on another processor? Run on two machines and compare.

    python benchmarks/cpu_determinism_probe.py [--json OUT] [--pipeline]

For each MKL branch (the stages' pin COMPATIBLE, and AVX2, the previous pin) it computes, in a fresh
process with the stages' other pins (ATen at AVX2, oneDNN at AVX2, 2 threads): an fp32 GEMM of the
shapes the bundled model multiplies, a softmax and a layer norm of it, and a large sum. Inputs are
built from integers, so they are the same bits everywhere without trusting a random generator. It
prints the processor and one hash per quantity; equal hashes on an Intel and an AMD machine are
the evidence the README's determinism claim rests on.

The single operations agree on an Intel Xeon and an AMD EPYC under the stages' pin, yet the base
stage wrote other bytes on each; so the probe also times nothing and hashes more: the GEMMs of a
backward pass (the transposed layouts), attention forward and backward, the cross-entropy and an
AdamW step, and with --pipeline the base stage itself, step by step (its tokenizer, the initial
weights, and the weights and loss after 1, 5 and 20 pretraining steps). The first hash that differs
between two machines names the first computation that does. It was AdamW (an Intel Xeon against an
AMD EPYC, 2026-12-07): torch's single-tensor loop takes its square roots from MKL's vector math, whose
last bit depends on the processor; `adamw_fused`, the same steps through the fused kernel (correctly
rounded roots), is what the stages now run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tasks import CPU_PINS  # noqa: E402

PROBE = r"""
import hashlib, json, torch
def ints(rows, cols, salt):
    n = torch.arange(rows * cols, dtype=torch.int64)
    return (((n * 7919 + salt) % 2003).to(torch.float32) / 2003.0 - 0.5).reshape(rows, cols)
h = lambda t: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
x, w = ints(16 * 64, 256, 1), ints(256, 688, 2)
y = x @ w
out = {"gemm": h(y), "softmax": h(torch.softmax(y, -1)), "layer_norm": h(torch.nn.functional.layer_norm(y, (688,))),
       "sum": h(ints(3000, 3000, 3).sum().reshape(1)), "threads": torch.get_num_threads(),
       "aten": torch.backends.cpu.get_cpu_capability()}
g = lambda t: t.detach().requires_grad_(True)
xg, wg = g(x), g(w)
(xg @ wg).mul(ints(16 * 64, 688, 4)).sum().backward()
out["gemm_backward"] = h(torch.cat([xg.grad.flatten(), wg.grad.flatten()]))
q, k, v = (g(ints(16 * 4 * 48, 64, s).reshape(16, 4, 48, 64)) for s in (5, 6, 7))
att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
att.mul(ints(16 * 4 * 48, 64, 8).reshape(16, 4, 48, 64)).sum().backward()
out["attention"] = h(torch.cat([att.flatten(), q.grad.flatten(), k.grad.flatten(), v.grad.flatten()]))
logits = g(ints(16 * 48, 1015, 9) * 20)
targets = torch.arange(16 * 48) * 37 % 1015
loss = torch.nn.functional.cross_entropy(logits, targets)
loss.backward()
out["cross_entropy"] = h(torch.cat([loss.reshape(1), logits.grad.flatten()]))
p = torch.nn.Parameter(ints(256, 688, 10))
opt = torch.optim.AdamW([p], lr=3e-3, weight_decay=0.1)
for salt in (11, 12, 13):
    p.grad = ints(256, 688, salt)
    opt.step()
out["adamw"] = h(p.detach())
p = torch.nn.Parameter(ints(256, 688, 10))  # the same steps through the fused kernel (the stages' AdamW)
opt = torch.optim.AdamW([p], lr=3e-3, weight_decay=0.1, fused=True)
for salt in (11, 12, 13):
    p.grad = ints(256, 688, salt)
    opt.step()
out["adamw_fused"] = h(p.detach())
print(json.dumps(out))
"""

# The base stage as tasks/base.py runs it, hashed at each point where two machines could first part
PIPELINE = r"""
import hashlib, json, torch
from loraflow.params import BundledBase
from tasks.base import build_model, pretrain, read_corpus, train_tokenizer
from pathlib import Path
h = lambda b: hashlib.sha256(b).hexdigest()[:16]
def weights(model):
    sd = model.state_dict()
    return h(b"".join(sd[k].detach().contiguous().numpy().tobytes() for k in sorted(sd)))
corpus = read_corpus(Path("data/base_corpus.txt"))
shape = BundledBase()
torch.manual_seed(shape.seed)
tok = train_tokenizer(corpus, shape.vocab_size)
out = {"tokenizer": h(tok.backend_tokenizer.to_str().encode()), "vocab": len(tok)}
out["init"] = weights(build_model(tok, shape))
for steps in (1, 5, 20):
    part = shape.model_copy(update={"pretrain_steps": steps})
    torch.manual_seed(part.seed)
    model = build_model(tok, part)
    losses = pretrain(model, tok, corpus, part)
    out[f"after_{steps}"] = {"weights": weights(model), "last_loss": losses[-1]}
print(json.dumps(out))
"""


def run(branch: str, code: str = PROBE) -> dict:
    env = {**os.environ, **CPU_PINS, "MKL_CBWR": branch}  # the stages' own pins, MKL's branch varied
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"the probe failed under MKL_CBWR={branch}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--pipeline", action="store_true", help="also the base stage, step by step (about a minute)")
    args = ap.parse_args()
    import torch
    from importlib.metadata import version
    from loraflow.stage import cpu_model
    result = {"cpu": cpu_model(), "torch": torch.__version__,
              "mkl": torch.backends.mkl.is_available() and torch.__config__.show().split("Math Kernel Library Version ")[-1].split(" ")[0],
              "transformers": version("transformers"), "tokenizers": version("tokenizers"),
              "branches": {b: run(b) for b in ("COMPATIBLE", "AVX2")}}
    if args.pipeline:
        result["base_stage"] = run("COMPATIBLE", PIPELINE)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
