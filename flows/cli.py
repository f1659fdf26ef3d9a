"""`loraflow` command line.

    loraflow run [--workdir DIR] [-S SECTION.KEY=VALUE ...] [--wait SECONDS]
        the pipeline as a Prefect flow (a temporary local server unless PREFECT_API_URL is set)
    loraflow repro
        the pipeline with `dvc repro` (what `make run` does)
    loraflow serve [--name NAME] [--cron "0 3 * * *"] [--workdir DIR]
        serve the flow as a deployment on a cron schedule
    loraflow lineage [--json]
        print raw data -> ... -> metrics for this workspace
    loraflow plan [--model DIR|ID] [--seq N] [--batch N] [--method M] [--budget-gib G] [--gpus N]
        the memory plan the train stage would make for a GPU, without training

`loraflow <command> --help` describes each flag.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the pipeline as a Prefect flow")
    p_run.add_argument("--workdir", default=".", help="project directory (default: .)")
    p_run.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a parameter for this run (written into params.yaml)")
    p_run.add_argument("--wait", type=float, default=0, help="seconds to wait for a busy workspace (default: 0)")
    sub.add_parser("repro", help="run the pipeline with dvc repro")
    p_serve = sub.add_parser("serve", help="serve the flow as a deployment with a cron schedule")
    p_serve.add_argument("--name", default="scheduled", help="the deployment's name: finetune/NAME (default: scheduled)")
    p_serve.add_argument("--cron", default=os.environ.get("LORAFLOW_CRON"),
                         help="cron schedule in UTC, e.g. \"0 3 * * *\" (default: $LORAFLOW_CRON, else params.yaml's "
                              "schedule.cron; none: runs only when triggered)")
    p_serve.add_argument("--workdir", default=".", help="project directory the runs work in (default: .)")
    p_lin = sub.add_parser("lineage", help="print the lineage of this workspace's results")
    p_lin.add_argument("--json", action="store_true", help="print reports/lineage.json as JSON")
    p_plan = sub.add_parser("plan", help="print the memory plan for training, without training")
    p_plan.add_argument("--model", help="model directory (a config.json is enough) or hub id; default: models/base")
    p_plan.add_argument("--seq", type=int, help="longest row in tokens; default: the train split's, else tokenize.max_length")
    p_plan.add_argument("--batch", type=int, help="rows per optimizer step (train.rows_per_step)")
    p_plan.add_argument("--method", choices=["lora", "lora8", "qlora", "auto"],
                        help="train.method to plan for; auto: the fastest that fits the budget")
    p_plan.add_argument("--budget-gib", type=float, help="GPU memory to plan for (train.memory_budget_gib)")
    p_plan.add_argument("--gpus", type=int, help="plan per GPU for training sharded over this many GPUs (FSDP; train.num_gpus)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from loraflow.errors import LoraflowError
    try:
        if args.command == "run":
            from loraflow.overrides import check, parse_cli
            overrides = parse_cli(args.set)
            # every override checked before Prefect starts: a bad key, or a secret that would be stored
            # in its database with the run's parameters, never reaches it
            check(Path(args.workdir) / "params.yaml", overrides)
            if not args.wait:  # a busy workspace is said plainly, before Prefect logs a failed run
                from loraflow.workspace import workspace_lock
                with workspace_lock(Path(args.workdir).resolve(), wait_s=0, holder="loraflow run (checking)"):
                    pass
            quiet_temporary_server()
            from flows.finetune import finetune
            results = finetune(workdir=args.workdir, overrides=overrides, wait_for_workspace_s=args.wait)
            for r in results:
                if not r["executed"]:
                    done = "up to date"
                elif r.get("restored_from_cache"):
                    done = "restored from the DVC run cache"
                else:
                    done = f"ran in {r['seconds']:.1f}s"
                print(f"{r['stage']}: {done}")
            return 0
        if args.command == "serve":
            from flows.deploy import serve
            serve(args.name, args.cron, args.workdir)
            return 0
        if args.command == "lineage":
            return lineage(args.json)
        if args.command == "plan":
            return plan(args)
    except LoraflowError as e:
        from loraflow.secrets import redact
        print(redact(f"loraflow {args.command}: error: {e}"), file=sys.stderr)
        return 2
    from loraflow.lockfile import main as check_lock
    return check_lock() or repro()


# Without PREFECT_API_URL, Prefect starts a temporary server for the run. Its defaults suit a long-lived
# one: the trigger service's periodic evaluation contends for the SQLite file with the run's own writes
# ("database is locked" tracebacks, PrefectHQ/prefect#15170), it reports analytics (failures logged
# offline), and it must start within 20 s (a loaded 2-core machine can take longer).
TEMPORARY_SERVER = {"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def quiet_temporary_server() -> None:
    """Settings for the temporary server a run without PREFECT_API_URL starts (yours take precedence)."""
    if not os.environ.get("PREFECT_API_URL"):
        for name, value in TEMPORARY_SERVER.items():
            os.environ.setdefault(name, value)


def repro() -> int:
    """`dvc repro`, its output passed on line by line but for the one warning a clean run gives
    (an empty rejects file: layout.EMPTY_REJECTS_WARNING)."""
    from loraflow import layout
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        if not layout.EMPTY_REJECTS_WARNING.match(line.strip()):
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.wait()


def plan(args) -> int:
    """The train stage's own planning code, on params.yaml with the flags' changes."""
    import torch
    import yaml
    from loraflow import layout, memplan
    from loraflow.modeling import BaseRef, compute_dtype, load_config, resolve_base
    from loraflow.params import TokenizeParams, TrainParams
    from loraflow.planning import Speed, make_plan, resolve_speed, write_plan
    raw = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").exists() else {}
    changes = {k: v for k, v in {"rows_per_step": args.batch, "method": args.method,
                                 "memory_budget_gib": args.budget_gib}.items() if v is not None}
    params = TrainParams(**{**raw.get("train", {}), **changes})
    ref = BaseRef(args.model) if args.model else resolve_base(layout.BASE_DIR)
    config = load_config(ref)
    seq = args.seq or longest_train_row() or TokenizeParams(**raw.get("tokenize", {})).max_length
    if torch.cuda.is_available():
        speed, dtype = resolve_speed(params, config.model_type), compute_dtype(params.dtype)
    else:
        # plan for the GPU the run is meant for: bf16, and the fast path unless params turn it off
        speed = Speed(packing=params.packing is not False, fused=params.fused_kernels is not False)
        dtype = torch.bfloat16 if params.dtype == "auto" else compute_dtype(params.dtype)
        print(f"no GPU here: planning for a CUDA GPU ({str(dtype)[6:]}, packing {speed.packing}, fused kernels {speed.fused})")
    tokens, vocab = 0, 0
    if not args.model and layout.CHAT_FORMAT.exists():  # the run's own chat tokens, as the train stage plans them
        from loraflow.training import run_tokens
        tokenizer, ids = run_tokens(params, ref)
        tokens, vocab = len(ids), len(tokenizer)
    result = make_plan(params, config, seq, speed, dtype, fsdp_gpus=args.gpus if args.gpus and args.gpus > 1 else None,
                       trainable_tokens=tokens, vocab_size=vocab)
    print(memplan.render(result))
    write_plan(result, layout.PLAN_PREVIEW_MD, layout.PLAN_PREVIEW_JSON)
    print(f"written to {layout.PLAN_PREVIEW_MD} and {layout.PLAN_PREVIEW_JSON}")
    return 0


def longest_train_row() -> int | None:
    from loraflow import layout
    if not layout.TRAIN_TOKENS.exists():
        return None
    import pandas as pd
    return int(pd.read_parquet(layout.TRAIN_TOKENS, columns=["input_ids"])["input_ids"].map(len).max())


def lineage(as_json: bool) -> int:
    from loraflow import layout
    from loraflow.lineage import build, describe
    if not Path("dvc.lock").exists():
        print("no dvc.lock here: run the pipeline first (make run)", file=sys.stderr)
        return 2
    data = json.loads(layout.LINEAGE.read_text()) if layout.LINEAGE.exists() else build()
    print(json.dumps(data, indent=2) if as_json else describe(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
