"""Where Unsloth's step time goes: peers_best.py's unsloth run, unchanged, with its timing loop wrapped so that
three steps after the warm-up run under train_bench.py's profiler (same kernel kinds as ours, same files in $OUT).

    python3 benchmarks/peers/profile_unsloth.py CKPT SEQ BATCH METHOD GC   # peers_best.py unsloth's arguments
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_best  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.train_bench import profile  # noqa: E402

timed_loop = peers_best.loop


def profiled_loop(m, opt, seq, batch, vocab, steps=7):
    result = timed_loop(m, opt, seq, batch, vocab, steps=3)  # warm-up (compiles, autotunes) and the figures
    tag = f"unsloth-{seq}x{batch}"
    profile(lambda: timed_loop(m, opt, seq, batch, vocab, steps=3), tag)  # its loop times steps 3 on
    return result


if __name__ == "__main__":
    peers_best.loop = profiled_loop
    peers_best.unsloth(*sys.argv[1:])
