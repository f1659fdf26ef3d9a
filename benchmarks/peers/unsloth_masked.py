"""Unsloth on rows whose first share of tokens is masked as an SFT prompt (-100 labels), the peer of
train_bench.py ours --prompt-share: peers_best.py's own run (kept unchanged, a copy of the shared file)
with only its training loop's labels masked.

  python3 unsloth_masked.py SHARE CKPT SEQ BATCH METHOD GC    # then as peers_best.py unsloth
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_best  # noqa: E402


def masked_loop(share: float):
    def loop(m, opt, seq, batch, vocab, steps=7):
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        labels = ids.clone()
        labels[:, :round(share * seq)] = -100
        times = []
        for _ in range(steps):
            torch.cuda.synchronize(); t = time.time()
            out = m(input_ids=ids, labels=labels)
            out.loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(); times.append(time.time() - t)
        st = sorted(times[2:])[len(times[2:]) // 2]
        return st, out.loss.item()
    return loop


if __name__ == "__main__":
    share, args = float(sys.argv[1]), sys.argv[2:]
    peers_best.loop = masked_loop(share)
    peers_best.unsloth(*args)
