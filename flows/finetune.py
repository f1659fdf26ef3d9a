"""The fine-tuning pipeline as a Prefect flow: each stage a separate task, in dvc.yaml's order.

    python -m flows.finetune            (or: loraflow run [-S section.key=value ...])

Wiring only. DVC decides what is out of date: each task asks `dvc status` about its own stage and,
if anything changed, runs `dvc repro --single-item <stage>`, which executes the same command as a
plain `dvc repro` and records the result in dvc.lock. So after a flow run `dvc status` is clean,
and after `dvc repro` a flow run re-executes nothing. Without PREFECT_API_URL, Prefect starts a
temporary local server for the run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency

from loraflow import layout, lockfile, overrides as overrides_mod
from loraflow.layout import STAGES
from loraflow.artifacts import sha256_tree, write_json
from loraflow.params import load_section, validate_all
from loraflow.processes import die_with_parent
from loraflow.workspace import workspace_lock

# Stages that hold the accelerator: a global concurrency limit of this name keeps two runs from
# training or generating on the same GPU at once (created by `loraflow serve`).
GPU_STAGES = {"base", "train", "merge", "evaluate"}
GPU_LIMIT = "loraflow-gpu"
INPUT_ERROR_EXIT = 2  # tasks' exit code for problems in the user's data or params: never retried
RETRY_DELAY_S = float(os.environ.get("LORAFLOW_RETRY_DELAY_S", "30"))  # between tries of a killed stage


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message carries the end of its output."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def dvc(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """The venv's dvc (and the venv's python for stage commands, whatever PATH the worker has), in its
    own process group, dying with this process; if this call is interrupted (a task timeout, a
    cancel), the whole group is killed, so no stage runs on without the run that started it."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(bindir / "dvc"), *args], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_parent)
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stale_stages(workdir: Path, stage: str | None = None) -> set[str]:
    proc = dvc(["status", *([stage] if stage else []), "--json"], workdir)
    if proc.returncode != 0:
        raise StageFailed(f"dvc status failed:\n{proc.stderr[-4000:]}", proc.returncode)
    return {name.split(":")[-1] for name in json.loads(proc.stdout or "{}")}


# DVC reports a stage's own exit as "failed to run: <cmd>, exited with <code>" and exits 255 itself;
# a negative code (or 128+n from a shell) is a signal: the OOM killer, a dying machine.
STAGE_EXIT = re.compile(r"exited with (-?\d+)")
LOCK_BUSY = ("is busy", "Unable to acquire lock")


def is_transient(failure: StageFailed) -> bool:
    """A stage killed by a signal, or DVC's lock held by another process: worth a retry. A stage that
    rejected its input (exit 2) fails the same way every time, so it is not retried."""
    if failure.returncode < 0 or any(marker in str(failure) for marker in LOCK_BUSY):
        return True
    codes = [int(c) for c in STAGE_EXIT.findall(str(failure))]
    return bool(codes) and (codes[-1] < 0 or codes[-1] > 128)


def stale_with_retries(root: Path, attempts: int = 3) -> set[str]:
    """The flow's first `dvc status`, retried like a stage when DVC's lock is busy."""
    for _ in range(attempts - 1):
        try:
            return stale_stages(root)
        except StageFailed as e:
            if not is_transient(e):
                raise
            time.sleep(RETRY_DELAY_S)
    return stale_stages(root)


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition for a stage task (see is_transient)."""
    try:
        state.result()
    except StageFailed as e:
        return is_transient(e)
    except Exception:
        return False
    return False


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=transient)
def run_stage(stage: str, workdir: str, maybe_stale: bool = True) -> dict:
    """Run one dvc.yaml stage if DVC says it is out of date."""
    logger = get_run_logger()
    root = Path(workdir)
    if not maybe_stale or stage not in stale_stages(root, stage):
        logger.info("%s is up to date: not re-executed", stage)
        return {"stage": stage, "executed": False}
    with concurrency(GPU_LIMIT, occupy=1, strict=False) if stage in GPU_STAGES else contextlib.nullcontext():
        proc = dvc(["repro", "--single-item", stage], root)
    for line in (proc.stderr + proc.stdout).splitlines():
        logger.info("%s", line)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} failed (exit {proc.returncode}):\n{(proc.stderr + proc.stdout)[-4000:]}",
                          proc.returncode)
    summary = json.loads((root / layout.stage_summary(stage)).read_text())
    # DVC restores a stage it ran before with the same inputs from its run cache instead of running
    # it: the summary's seconds are then the earlier run's, not this one's
    restored = "is cached - skipping run" in proc.stdout + proc.stderr
    return {**summary, "executed": True, "restored_from_cache": restored}


def fingerprints(workdir: Path, overrides: dict[str, Any]) -> tuple[str, str]:
    """Short hashes of the raw data and of the effective params, for the run's name."""
    merged = overrides_mod.check(workdir / "params.yaml", overrides)
    sections = validate_all(merged, "params")
    params_hash = sha256_text(json.dumps({k: v.model_dump() for k, v in sections.items()}, sort_keys=True))
    paths = [s if isinstance(s, str) else s.path for s in sections["ingest"].sources]
    data_hash = sha256_text("".join(sha256_tree(workdir / p) for p in paths if p and (workdir / p).exists()))
    return data_hash[:8], params_hash[:8]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run_name() -> str:
    p = runtime.flow_run.parameters
    try:
        data, params = fingerprints(Path(p.get("workdir", ".")).resolve(), p.get("overrides") or {})
    except Exception:  # a bad override: the flow itself reports it, by name, as it starts
        return "finetune-invalid-params"
    return f"data-{data}-params-{params}"


def publish_artifacts(root: Path, results: list[dict]) -> None:
    create_table_artifact(key="stages", description="what this run executed",
                          table=[{"stage": r["stage"], "executed": r["executed"], "seconds": r.get("seconds", "")}
                                 for r in results])
    metrics_file = root / layout.METRICS
    if metrics_file.exists():
        m = json.loads(metrics_file.read_text())
        rows = "\n".join(f"| {k} | {m['base'][k]} | {m['tuned'][k]} | {m['delta'].get(k, '')} |"
                         for k in ("exact_match", "rouge1", "rouge2", "rougeL"))
        create_markdown_artifact(key="metrics", description="held-out metrics, base vs fine-tuned",
                                 markdown=f"| metric | base | tuned | delta |\n|---|---|---|---|\n{rows}\n")
    for key, path in (("generation-audit", layout.GENERATION_AUDIT), ("validation-report", layout.VALIDATION_MD),
                      ("promotion", layout.PROMOTION_MD), ("data-changes", layout.DATA_CHANGES_MD)):
        if (root / path).exists():
            create_markdown_artifact(key=key, markdown=(root / path).read_text(), description=str(path))
    links = [f"- [{p}]({(root / p).as_uri()})" for p in sorted(q.relative_to(root) for q in (root / "reports").glob("*.*"))]
    create_markdown_artifact(key="report-files", description="files in reports/", markdown="\n".join(links) or "none")


@flow(name="finetune", flow_run_name=run_name, log_prints=True)
def finetune(workdir: str = ".", overrides: dict[str, Any] | None = None, wait_for_workspace_s: float = 0) -> list[dict]:
    """Run every stage in order; each is skipped when DVC finds it up to date.

    overrides: dotted params keys, e.g. {"train.lr": 0.001}, checked before any stage runs and
    written into params.yaml. wait_for_workspace_s: how long to wait if another run holds the workspace.
    """
    logger = get_run_logger()
    root = Path(workdir).resolve()
    overrides = overrides or {}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with workspace_lock(root, wait_s=wait_for_workspace_s, holder=str(runtime.flow_run.name)):
        overrides_mod.apply(root / "params.yaml", overrides)
        if overrides:
            logger.info("overrides written to params.yaml: %s", overrides)
        t0 = time.perf_counter()
        restored = lockfile.check_or_restore(root)
        if restored:
            logger.warning("%s", restored)
        stale = stale_with_retries(root)
        if not stale:
            logger.info("nothing changed since the last run (data, params and code as recorded in dvc.lock): "
                        "no stage will be re-executed")
        results, upstream_ran = [], False
        timeout = load_section("schedule", root / "params.yaml").stage_timeout_s
        for stage in STAGES:
            # A stage not stale at the start becomes stale only if an upstream stage re-executed.
            r = run_stage.with_options(timeout_seconds=timeout)(stage, str(root), maybe_stale=upstream_ran or stage in stale)
            upstream_ran |= r["executed"]
            results.append(r)
        executed = [r["stage"] for r in results if r["executed"]]
        logger.info("re-executed %d of %d stages in %.1fs: %s", len(executed), len(STAGES),
                    time.perf_counter() - t0, ", ".join(executed) or "none")
        write_json(root / layout.RUN_RECORD, {
            "flow_run": str(runtime.flow_run.name), "flow_run_id": str(runtime.flow_run.id), "started": started,
            "overrides": overrides, "executed": executed})
    publish_artifacts(root, results)
    return results


if __name__ == "__main__":
    finetune()
