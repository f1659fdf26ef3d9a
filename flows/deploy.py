"""Serve the fine-tuning flow as a deployment with a retraining schedule.

    python -m flows.deploy --name nightly --cron "0 3 * * *"      (or: loraflow serve ...)
    prefect deployment run 'finetune/nightly' --param overrides='{"train.lr": 0.001}' --watch

The process stays up, polls the Prefect server (PREFECT_API_URL) and runs each scheduled or
triggered flow run in this workspace. The cron comes from --cron, else LORAFLOW_CRON, else
params.yaml's schedule.cron; with none of them the deployment runs only when triggered.
For a work pool instead, see prefect.yaml.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from flows.finetune import ensure_gpu_limit, finetune
from loraflow.params import load_section


def resolve_cron(cron: str | None, workdir: str) -> str | None:
    """--cron (or LORAFLOW_CRON, its default) wins; else params.yaml's schedule.cron."""
    return cron if cron is not None else load_section("schedule", Path(workdir) / "params.yaml").cron


# A run that finds the workspace held by another (the other deployment's 03:00 run, a manual run)
# waits up to this long for it instead of failing.
WAIT_FOR_WORKSPACE_S = 6 * 3600


def serve(name: str, cron: str | None, workdir: str) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    ensure_gpu_limit()
    # one run of this deployment at a time; a second (a trigger during the nightly run) queues
    finetune.serve(name=name, cron=resolve_cron(cron, workdir),
                   parameters={"workdir": str(Path(workdir).resolve()), "wait_for_workspace_s": WAIT_FOR_WORKSPACE_S},
                   global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE"),
                   description="loraflow fine-tuning pipeline; stages rerun only when DVC finds them stale",
                   tags=["loraflow"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    p.add_argument("--cron", default=os.environ.get("LORAFLOW_CRON"), help='e.g. "0 3 * * *"')
    p.add_argument("--workdir", default=".", help="project directory the runs work in")
    args = p.parse_args(argv)
    serve(args.name, args.cron, args.workdir)


if __name__ == "__main__":
    main()
