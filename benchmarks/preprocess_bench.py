"""Preprocessing throughput and peak memory: loraflow's validate + template + tokenize against TRL
SFTTrainer's own preprocessing of the same chat rows with the same tokenizer, in the same run.

    .venv/bin/python benchmarks/preprocess_bench.py --rows 1000 10000 100000 [--out benchmarks/results/preprocess-cpu.json]

Rows are realistic chat data built from the bundled templates: 1-3 user/assistant exchanges, some
with a system turn, every row unique. Each (rows, implementation) runs in a fresh process, so peak
RSS is that run's own. The base tokenizer is models/base (run `dvc repro base` first).
Ours is measured from the ingested table (JSONL already parsed, as the validate stage reads it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "models/base"


def make_rows(n: int, seed: int = 0) -> list[dict]:
    sys.path.insert(0, str(ROOT / "data"))
    import make_sample as ms
    rng = random.Random(seed)
    qa = [(q, a) for _, q, a in ms.checkable_rows(random.Random(1)) + ms.freeform_rows()]
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": f"You are assistant number {i}."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            q, a = rng.choice(qa)
            msgs += [{"role": "user", "content": f"{q} (request {i})"}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(path: str) -> dict:
    from loraflow.chat_format import chat_format_for
    from loraflow.params import TemplateParams, TokenizeParams, ValidateParams
    from tasks.ingest import ingest
    from tasks.template import template_rows
    from tasks.tokenize import tokenize_rows
    from tasks.validate import reasons_by_row
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    df = ingest([path])
    t0 = time.perf_counter()
    reasons = reasons_by_row(df, ValidateParams())
    accepted = df[~df.index.isin(list(reasons))]
    t1 = time.perf_counter()
    render, chat = chat_format_for(tok, TemplateParams())
    templated, _ = template_rows(accepted, render, chat, TemplateParams())
    t2 = time.perf_counter()
    tokens, rejects = tokenize_rows(templated, tok, TokenizeParams(max_length=4096))
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "validate_s": t1 - t0, "template_s": t2 - t1, "tokenize_s": t3 - t2,
            "rows_out": len(tokens), "tokens": int(tokens["length"].sum())}


def run_trl(path: str) -> dict:
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = [json.loads(l) for l in open(path)]
    ds = Dataset.from_list(rows)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, report_to="none", max_length=4096, use_cpu=True)
        t0 = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        t1 = time.perf_counter()
    return {"seconds": t1 - t0, "rows_out": len(trainer.train_dataset),
            "tokens": int(sum(len(x) for x in trainer.train_dataset["input_ids"]))}


def child(impl: str, path: str) -> None:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp()  # no cache hits between runs
    result = (run_ours if impl == "loraflow" else run_trl)(path)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    results = []
    for n in a.rows:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            for row in make_rows(n):
                f.write(json.dumps(row) + "\n")
        for impl in ("loraflow", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--child", impl, f.name], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{impl} at {n} rows failed:\n{proc.stderr[-3000:]}")
            r = {"rows": n, "impl": impl, **json.loads(line[7:])}
            r["rows_per_s"] = round(n / r["seconds"], 1)
            results.append(r)
            print(json.dumps(r), flush=True)
        os.unlink(f.name)
    print("\n| rows | loraflow s | TRL s | speed vs TRL | loraflow peak MB | TRL peak MB |\n|---|---|---|---|---|---|")
    for n in a.rows:
        ours = next(r for r in results if r["rows"] == n and r["impl"] == "loraflow")
        trl = next(r for r in results if r["rows"] == n and r["impl"] == "trl")
        print(f"| {n} | {ours['seconds']:.2f} | {trl['seconds']:.2f} | {trl['seconds'] / ours['seconds']:.2f}x | "
              f"{ours['peak_rss_mb']} | {trl['peak_rss_mb']} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores", "results": results},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
