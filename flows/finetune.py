"""The fine-tuning pipeline as a Prefect flow: each stage a separate task, in dvc.yaml's order.

    python -m flows.finetune            (or: loraflow run)

Wiring only. DVC decides what is out of date: each task asks `dvc status` about its own stage and,
if anything changed, runs `dvc repro --single-item <stage>`, which executes the same command as a
plain `dvc repro` and records the result in dvc.lock. So after a flow run `dvc status` is clean,
and after `dvc repro` a flow run re-executes nothing. Without PREFECT_API_URL, Prefect starts a
temporary local server for the run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from loraflow import layout

STAGES = ("base", "ingest", "validate", "template", "tokenize", "train", "merge", "evaluate")


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message carries the end of its output."""


def dvc(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    # The venv's dvc, and the venv's python for stage commands, whatever PATH the worker has.
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(bindir / "dvc"), *args], cwd=workdir, env=env, capture_output=True, text=True)


def is_stale(stage: str, workdir: Path) -> bool:
    proc = dvc(["status", stage, "--json"], workdir)
    if proc.returncode != 0:
        raise StageFailed(f"dvc status {stage} failed:\n{proc.stderr[-4000:]}")
    return bool(json.loads(proc.stdout or "{}"))


@task(task_run_name="{stage}")
def run_stage(stage: str, workdir: str) -> dict:
    """Run one dvc.yaml stage if DVC says it is out of date."""
    logger = get_run_logger()
    root = Path(workdir)
    if not is_stale(stage, root):
        logger.info("%s is up to date: not re-executed", stage)
        return {"stage": stage, "executed": False}
    proc = dvc(["repro", "--single-item", stage], root)
    for line in (proc.stderr + proc.stdout).splitlines():
        logger.info("%s", line)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads((root / layout.stage_summary(stage)).read_text())
    return {**summary, "executed": True}


def publish_artifacts(root: Path) -> None:
    metrics_file = root / layout.METRICS
    if metrics_file.exists():
        m = json.loads(metrics_file.read_text())
        rows = "\n".join(f"| {k} | {m['base'][k]} | {m['tuned'][k]} |" for k in ("exact_match", "rouge1", "rouge2", "rougeL"))
        create_markdown_artifact(key="metrics", description="held-out metrics, base vs fine-tuned",
                                 markdown=f"| metric | base | tuned |\n|---|---|---|\n{rows}\n")
    audit = root / layout.GENERATION_AUDIT
    if audit.exists():
        create_markdown_artifact(key="generation-audit", markdown=audit.read_text(), description="generation audit")


@flow(name="finetune", log_prints=True)
def finetune(workdir: str = ".") -> list[dict]:
    """Run every stage in order; each is skipped when DVC finds it up to date."""
    root = Path(workdir).resolve()
    results = [run_stage(stage, str(root)) for stage in STAGES]
    executed = [r["stage"] for r in results if r["executed"]]
    get_run_logger().info("re-executed %d of %d stages: %s", len(executed), len(STAGES), ", ".join(executed) or "none")
    publish_artifacts(root)
    return results


if __name__ == "__main__":
    finetune()
