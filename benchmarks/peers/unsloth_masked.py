"""Unsloth on rows whose first share of tokens is masked as an SFT prompt (-100 labels), the peer of
train_bench.py ours --prompt-share: peers_best.py's own run (kept unchanged, a copy of the shared file)
with only the labels its training loop passes masked.

  python3 unsloth_masked.py SHARE CKPT SEQ BATCH METHOD GC    # then as peers_best.py unsloth
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_best  # noqa: E402


class MaskedPrompt:
    """The model as peers_best's loop calls it, with the first `share` of each row's labels masked."""
    def __init__(self, model, share: float):
        self.model, self.share = model, share

    def __call__(self, input_ids, labels):
        labels = labels.clone()
        labels[:, :round(self.share * labels.shape[1])] = -100
        return self.model(input_ids=input_ids, labels=labels)


def masked_loop(share: float, plain_loop=peers_best.loop):
    def loop(m, opt, seq, batch, vocab, steps=7):
        return plain_loop(MaskedPrompt(m, share), opt, seq, batch, vocab, steps)
    return loop


if __name__ == "__main__":
    share, args = float(sys.argv[1]), sys.argv[2:]
    peers_best.loop = masked_loop(share)
    peers_best.unsloth(*args)
