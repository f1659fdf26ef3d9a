"""`loraflow` command line.

    loraflow run [-S train.lr=0.001 ...]   the pipeline as a Prefect flow (a temporary local server
                                           unless PREFECT_API_URL is set)
    loraflow repro                         the pipeline with `dvc repro` (what `make run` does)
    loraflow serve --name N --cron "0 3 * * *"   serve the flow as a scheduled deployment
    loraflow lineage                       print raw data -> ... -> metrics for this workspace
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the pipeline as a Prefect flow")
    p_run.add_argument("--workdir", default=".", help="project directory (default: .)")
    p_run.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a parameter for this run (written into params.yaml)")
    p_run.add_argument("--wait", type=float, default=0, help="seconds to wait for a busy workspace (default: 0)")
    sub.add_parser("repro", help="run the pipeline with dvc repro")
    p_serve = sub.add_parser("serve", help="serve the flow as a deployment with a cron schedule")
    p_serve.add_argument("--name", default="scheduled")
    p_serve.add_argument("--cron", default=os.environ.get("LORAFLOW_CRON"))
    p_serve.add_argument("--workdir", default=".")
    p_lin = sub.add_parser("lineage", help="print the lineage of this workspace's results")
    p_lin.add_argument("--json", action="store_true", help="print reports/lineage.json as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from loraflow.errors import LoraflowError
    try:
        if args.command == "run":
            from flows.finetune import finetune
            from loraflow.overrides import parse_cli
            results = finetune(workdir=args.workdir, overrides=parse_cli(args.set), wait_for_workspace_s=args.wait)
            for r in results:
                print(f"{r['stage']}: {'ran in %.1fs' % r['seconds'] if r['executed'] else 'up to date'}")
            return 0
        if args.command == "serve":
            from flows.deploy import serve
            serve(args.name, args.cron, args.workdir)
            return 0
        if args.command == "lineage":
            return lineage(args.json)
    except LoraflowError as e:
        print(f"loraflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    return subprocess.call([str(Path(sys.executable).parent / "dvc"), "repro"])


def lineage(as_json: bool) -> int:
    from loraflow import layout
    from tasks.lineage import build, describe
    if not Path("dvc.lock").exists():
        print("no dvc.lock here: run the pipeline first (make run)", file=sys.stderr)
        return 2
    data = json.loads(layout.LINEAGE.read_text()) if layout.LINEAGE.exists() else build()
    print(json.dumps(data, indent=2) if as_json else describe(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
