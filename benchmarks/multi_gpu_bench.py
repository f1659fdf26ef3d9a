"""Multi-GPU training through the train stage itself (train.num_gpus, accelerate FSDP): tokens/s on N
GPUs against 1, and the peak on every GPU. Needs `nvidia-h200-x2` or larger.

    python3 benchmarks/train_bench.py make /dev/shm/llama8b                 # random-init Llama-3.1-8B
    python3 benchmarks/multi_gpu_bench.py prepare /tmp/ws8b --ckpt /dev/shm/llama8b --rows 256 --seq 2048
    python3 benchmarks/multi_gpu_bench.py run /tmp/ws8b --gpus 1 --method lora --steps 20
    python3 benchmarks/multi_gpu_bench.py run /tmp/ws8b --gpus 2 --method lora --steps 20
    python3 benchmarks/multi_gpu_bench.py run /tmp/ws8b --gpus 2 --method qlora --steps 20

`prepare` makes a workspace the train stage can run in: synthetic rows of --seq random token ids
(every token trained), the checkpoint linked as models/base, and a small tokenizer beside it (the stage
needs one for its pad id; the ids themselves come from the rows). `run` runs `python -m tasks.train`
there with train.num_gpus set and prints one JSON line: tokens/s from the stage's own timing, the
memory plan's predicted peak per GPU, and the measured peak of every process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(args) -> None:
    import pandas as pd
    import torch
    import yaml
    sys.path.insert(0, str(ROOT))
    from tasks.base import train_tokenizer
    ws, ckpt = Path(args.ws), Path(args.ckpt).resolve()
    base = ws / "models/base"
    base.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if not (base / f.name).exists():
            (base / f.name).symlink_to(f)
    corpus = (ROOT / "data/base_corpus.txt").read_text().splitlines()
    train_tokenizer(corpus, 600).save_pretrained(base)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, vocab, (args.seq,), generator=g).tolist() for _ in range(args.rows)]
    df = pd.DataFrame({"input_ids": rows, "labels": rows, "length": args.seq, "trained_tokens": args.seq - 1})
    (ws / "data/processed").mkdir(parents=True, exist_ok=True)
    df.to_parquet(ws / "data/processed/train.parquet")
    df.head(8).to_parquet(ws / "data/processed/eval.parquet")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump({"train": params["train"]}))
    print(f"workspace {ws}: {args.rows} rows of {args.seq} tokens, base {ckpt}")


def run(args) -> None:
    import yaml
    ws = Path(args.ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"].update(num_gpus=args.gpus, method=args.method, max_steps=args.steps, rows_per_step=args.batch,
                           save_steps=10**6, modules_to_save=[], trainable_tokens=[])
    path = ws / f"params-{args.method}-{args.gpus}.yaml"
    path.write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "tasks.train", "--params", str(path)], cwd=ws,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    if done.returncode != 0:
        print(json.dumps({"gpus": args.gpus, "method": args.method, "error": f"exit {done.returncode}"}))
        sys.exit(done.returncode)
    s = json.loads((ws / "reports/stages/train.json").read_text())
    plan = json.loads((ws / "reports/memory_plan.json").read_text())
    tokens = s["steps"] * args.batch * _seq(ws)
    print(json.dumps({"gpus": args.gpus, "method": args.method, "processes": s["processes"], "fsdp": s["fsdp"],
                      "steps": s["steps"], "tokens_per_s": round(tokens / s["train_seconds"], 1),
                      "predicted_peak_gib_per_gpu": s["predicted_peak_gib"],
                      "measured_peak_gib_per_process": s["measured_peak_gib_per_process"],
                      "micro_batch": s["micro_batch"], "checkpoint_layers": s["checkpoint_layers"],
                      "plan_fits": plan["fits"], "loss_first": s["train_loss_first"], "loss_last": s["train_loss_last"]}))


def _seq(ws: Path) -> int:
    import pandas as pd
    return int(pd.read_parquet(ws / "data/processed/train.parquet", columns=["length"])["length"].iloc[0])


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("ws")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--rows", type=int, default=256)
    a.add_argument("--seq", type=int, default=2048)
    b = sub.add_parser("run")
    b.add_argument("ws")
    b.add_argument("--gpus", type=int, default=1)
    b.add_argument("--method", default="lora", choices=["lora", "qlora"])
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--batch", type=int, default=8, help="rows per optimizer step, split over the GPUs")
    args = p.parse_args()
    {"prepare": prepare, "run": run}[args.cmd](args)


if __name__ == "__main__":
    main()
