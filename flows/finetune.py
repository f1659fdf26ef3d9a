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
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency

from loraflow import layout, lockfile, overrides as overrides_mod
from loraflow.layout import STAGES
from loraflow.artifacts import sha256_tree, write_json
from loraflow.families import family_table
from loraflow.params import load_section, validate_all
from loraflow.processes import die_with_parent
from loraflow.workspace import workspace_lock

# Stages that hold the accelerator: a global concurrency limit of this name keeps two runs from
# training or generating on the same GPU at once. Every run creates it if it is missing and then
# holds it strictly, whichever path started the run (loraflow run, serve, a work-pool worker).
GPU_STAGES = {"base", "train", "merge", "evaluate"}
GPU_LIMIT = "loraflow-gpu"
INPUT_ERROR_EXIT = 2  # tasks' exit code for problems in the user's data or params: never retried
RETRY_DELAY_S = float(os.environ.get("LORAFLOW_RETRY_DELAY_S", "30"))  # between tries of a killed stage
# The GPU slot is a lease that the holder's Prefect client renews every 3/4 of this: a run killed with
# -9 cannot give its slot back, so the server takes it back when the lease lapses. Prefect's default
# (300 s) kept the next run waiting five minutes behind a dead one; 60 s costs one renewal call a 45 s.
# A renewal that fails (a server too slow or gone) only warns: Prefect's strict default would cancel
# the stage, and hours of training are not lost to a late heartbeat.
GPU_LEASE_S = 60.0
GPU_WAIT_REPORT_S = 15.0  # a run waiting for the slot says so this often, so a queue is not taken for a hang


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message carries the end of its output."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def ensure_gpu_limit(limit: int = 1) -> bool:
    """Create the GPU concurrency limit if the server has none (idempotent). True when this call made it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=limit))
        except ObjectAlreadyExists:
            return False
    return True


@contextlib.contextmanager
def gpu_slot(stage: str, logger: logging.Logger | logging.LoggerAdapter):
    """Hold the GPU slot while the body runs; while waiting for it, say so every GPU_WAIT_REPORT_S."""
    started = time.monotonic()
    with contextlib.ExitStack() as held:
        while True:
            try:
                held.enter_context(concurrency(GPU_LIMIT, occupy=1, strict=True, timeout_seconds=GPU_WAIT_REPORT_S,
                                               lease_duration=GPU_LEASE_S, raise_on_lease_renewal_failure=False))
                break
            except TimeoutError:
                logger.info("%s waits for the GPU slot (%.0f s so far): another run holds it, or a killed run's "
                            "lease lapses within %.0f s", stage, time.monotonic() - started, GPU_LEASE_S)
        waited = time.monotonic() - started
        if waited >= GPU_WAIT_REPORT_S:
            logger.info("%s got the GPU slot after %.0f s", stage, waited)
        yield


def dvc(args: list[str], workdir: Path, on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """The venv's dvc (and the venv's python for stage commands, whatever PATH the worker has), in its
    own process group, dying with this process; if this call is interrupted (a task timeout, a
    cancel), the whole group is killed, so no stage runs on without the run that started it.
    on_line: called with each line of output as it comes (stderr merged into stdout)."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(bindir / "dvc"), *args], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if on_line else subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=die_with_parent)
    try:
        if on_line is None:
            out, err = proc.communicate()
        else:
            lines = []
            for line in proc.stdout:  # universal newlines: a progress bar's \r updates come as lines too
                lines.append(line)
                on_line(line.rstrip("\n"))
            proc.wait()
            out, err = "".join(lines), ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# A stage's own log line (loraflow/stage.py's format): its time is dropped, Prefect stamps its own
STAGE_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<name>\S+) "
                       r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)(?: (?P<message>.*))?$")
DVC_LEVEL = re.compile(r"^(?P<level>WARNING|ERROR):\s*(?P<message>.*)$")
PROGRESS_BAR = re.compile(r"\d+%\|.*\||\d+(\.\d+)?(it|s)/(s|it)\]")
# DVC's advice after every repro, meant for someone committing by hand
DVC_HINTS = ("To track the changes with git, run:", "git add dvc.lock", "To enable auto staging, run:",
             "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")


def stage_log_line(line: str) -> tuple[int, str] | None:
    """A line of `dvc repro` output as (level, message) for the flow's log; None for what a reader of
    the flow run does not need: blank lines, progress bars, DVC's git hints, an empty rejects file."""
    text = line.strip()
    if (not text or PROGRESS_BAR.search(text) or any(hint in text for hint in DVC_HINTS)
            or layout.EMPTY_REJECTS_WARNING.match(text)):
        return None
    m = STAGE_LOG.match(text)
    if m:  # a blank line the stage logged (between tables) has nothing to say here
        return (getattr(logging, m["level"]), f"{m['name']}: {m['message']}") if m["message"] else None
    m = DVC_LEVEL.match(text)
    if m:
        return getattr(logging, m["level"]), f"dvc: {m['message']}"
    if text.startswith("Traceback") or text.endswith("Error") or re.match(r"^\w+(Error|Exception): ", text):
        return logging.ERROR, text
    return logging.INFO, text


def dvc_status(workdir: Path, stage: str | None = None) -> dict:
    proc = dvc(["status", *([stage] if stage else []), "--json"], workdir)
    if proc.returncode != 0:
        raise StageFailed(f"dvc status failed:\n{proc.stderr[-4000:]}", proc.returncode)
    return {name.split(":")[-1]: changes for name, changes in json.loads(proc.stdout or "{}").items()}


def stale_stages(workdir: Path, stage: str | None = None) -> set[str]:
    return set(dvc_status(workdir, stage))


def stages_missing_outputs(status: dict) -> list[str]:
    """Stages whose recorded outputs `dvc status` finds deleted: `dvc repro` removes a stage's outputs
    as it starts it, so a run killed or cancelled mid-stage leaves them so."""
    return [name for name, changes in status.items()
            if any(isinstance(c, dict) and "deleted" in (c.get("changed outs") or {}).values() for c in changes)]


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


def status_with_retries(root: Path, attempts: int = 3) -> dict:
    """The flow's first `dvc status`, retried like a stage when DVC's lock is busy."""
    for _ in range(attempts - 1):
        try:
            return dvc_status(root)
        except StageFailed as e:
            if not is_transient(e):
                raise
            time.sleep(RETRY_DELAY_S)
    return dvc_status(root)


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

    def relay(line: str) -> None:  # each line of the stage's output as it comes, at its own level
        entry = stage_log_line(line)
        if entry:
            logger.log(*entry)

    def put_back() -> None:
        if not restore_outputs(root, stage):
            logger.warning("%s's earlier outputs could not be restored: DVC's cache has no copy", stage)

    if not maybe_stale or stage not in stale_stages(root, stage):
        logger.info("%s is up to date: not re-executed", stage)
        return {"stage": stage, "executed": False}
    try:
        with gpu_slot(stage, logger) if stage in GPU_STAGES else contextlib.nullcontext():
            proc = dvc(["repro", "--single-item", stage], root, on_line=relay)
    except BaseException:  # a timeout or a cancel: dvc's group is killed (dvc()); put back what it deleted
        put_back()
        raise
    if proc.returncode != 0:
        codes = STAGE_EXIT.findall(proc.stderr + proc.stdout)
        # a stage that rejected its input wrote why (the validation report, the rejects): those stay
        if not (codes and int(codes[-1]) == INPUT_ERROR_EXIT):
            put_back()
        raise StageFailed(f"stage {stage} failed (exit {proc.returncode}):\n{(proc.stderr + proc.stdout)[-4000:]}",
                          proc.returncode)
    summary = json.loads((root / layout.stage_summary(stage)).read_text())
    # DVC restores a stage it ran before with the same inputs from its run cache instead of running
    # it: the summary's seconds are then the earlier run's, not this one's
    restored = "is cached - skipping run" in proc.stdout + proc.stderr
    return {**summary, "executed": True, "restored_from_cache": restored}


def restore_outputs(root: Path, stage: str) -> bool:
    """Put back the stage's outputs as dvc.lock records them (the last good run's, from DVC's cache)
    where a run of it that did not finish left them deleted or half-written. False when DVC has no
    copy (its first run, or a clone that has not pulled)."""
    ok = dvc(["checkout", "--force", stage], root).returncode == 0
    if ok:
        get_run_logger().warning("%s did not finish in an earlier or this run: its last good outputs are restored "
                                 "(dvc checkout %s)", stage, stage)
    return ok


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


SPARK = "▁▂▃▄▅▆▇█"


def loss_curve_markdown(csv_path: Path, width: int = 60, rows: int = 25) -> str:
    """The training loss as the Prefect UI shows it without images: a one-line chart of the whole
    curve (each mark one span of steps, its height the mean loss there), then the numbers at evenly
    spaced steps."""
    import csv
    points = [r for r in csv.DictReader(csv_path.open()) if r.get("loss")]
    if not points:
        return "no training loss was logged"
    losses = [float(r["loss"]) for r in points]
    marks = min(width, len(losses))
    spans = [losses[i * len(losses) // marks:(i + 1) * len(losses) // marks] for i in range(marks)]
    means = [sum(s) / len(s) for s in spans]
    low, high = min(means), max(means)
    chart = "".join(SPARK[round((m - low) / (high - low) * (len(SPARK) - 1)) if high > low else 0] for m in means)
    shown = min(rows, len(points))
    picked = sorted({round(i * (len(points) - 1) / max(shown - 1, 1)) for i in range(shown)})
    table = "\n".join(f"| {points[i]['step']} | {float(points[i]['loss']):.4f} | {points[i].get('eval_loss') or ''} |"
                      for i in picked)
    return (f"loss from {losses[0]:.4f} (step {points[0]['step']}) to {losses[-1]:.4f} (step {points[-1]['step']}), "
            f"lowest {min(losses):.4f}\n\n```\n{high:8.4f} ┤\n         {chart}\n{low:8.4f} ┤\n```\n\n"
            f"| step | loss | eval loss |\n|---|---|---|\n{table}\n")


def publish_artifacts(root: Path, results: list[dict]) -> None:
    """What a reader of the run opens in the Prefect UI, with the content itself (tables and markdown,
    no links to files on the worker's disk). Called when the run fails too: then the validation
    report and the rejects say why."""
    if results:
        create_table_artifact(key="stages", description="what this run executed",
                              table=[{"stage": r["stage"], "executed": r["executed"], "seconds": r.get("seconds", "")}
                                     for r in results])
    metrics_file = root / layout.METRICS
    if metrics_file.exists():
        m = json.loads(metrics_file.read_text())
        rows = "\n".join(f"| {k} | {m['base'][k]} | {m['tuned'][k]} | {m['delta'].get(k, '')} |"
                         for k in ("exact_match", "rouge1", "rouge2", "rougeL"))
        families = "\n".join(["", "By family:", ""] + family_table(m["by_family"])) if m.get("by_family") else ""
        create_markdown_artifact(key="metrics", description="held-out metrics, base vs fine-tuned",
                                 markdown=f"| metric | base | tuned | delta |\n|---|---|---|---|\n{rows}\n{families}\n")
    if (root / layout.LOSS_CSV).exists():
        create_markdown_artifact(key="loss-curve", description=str(layout.LOSS_CSV),
                                 markdown=loss_curve_markdown(root / layout.LOSS_CSV))
    for key, path in (("generation-audit", layout.GENERATION_AUDIT), ("validation-report", layout.VALIDATION_MD),
                      ("mask-audit", layout.MASK_AUDIT_MD), ("memory-plan", layout.MEMORY_PLAN_MD),
                      ("promotion", layout.PROMOTION_MD), ("data-changes", layout.DATA_CHANGES_MD)):
        if (root / path).exists():
            create_markdown_artifact(key=key, markdown=(root / path).read_text(), description=str(path))
    rejects = root / layout.REJECTS
    if rejects.exists() and rejects.stat().st_size:
        rows = [json.loads(line) for line in rejects.read_text().splitlines() if line.strip()]
        create_table_artifact(key="rejects", description=f"{len(rows)} rows rejected ({layout.REJECTS}; first 100)",
                              table=[{"where": f"{r.get('source')}:{r.get('line')}", "id": r.get("id"),
                                      "reasons": "; ".join(r.get("reasons") or [])[:300]} for r in rows[:100]])
    files = sorted(p for p in (root / "reports").glob("*.*") if p.is_file())
    create_table_artifact(key="report-files", description="files in reports/ (their content is in this run's other artifacts)",
                          table=[{"file": str(p.relative_to(root)), "bytes": p.stat().st_size,
                                  "written": datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")}
                                 for p in files])


@flow(name="finetune", flow_run_name=run_name, log_prints=True)
def finetune(workdir: str = ".", overrides: dict[str, Any] | None = None, wait_for_workspace_s: float = 0) -> list[dict]:
    """Run every stage in order; each is skipped when DVC finds it up to date.

    overrides: dotted params keys, e.g. {"train.lr": 0.001}, checked before any stage runs and in
    effect for this run only: params.yaml is restored when the run ends, however it ends, so a later
    run (the nightly schedule) does not inherit them. dvc.lock and the outputs stay as this run made
    them, so `dvc status` then names the overridden params as changed, and the next run without them
    re-executes the stages that read them. wait_for_workspace_s: how long to wait if another run holds
    the workspace.
    """
    logger = get_run_logger()
    root = Path(workdir).resolve()
    overrides = overrides or {}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if ensure_gpu_limit():
        logger.info("created the global concurrency limit %r (1 slot): GPU stages of concurrent runs queue", GPU_LIMIT)
    results: list[dict] = []
    with workspace_lock(root, wait_s=wait_for_workspace_s, holder=str(runtime.flow_run.name)), \
            overrides_mod.for_this_run(root / "params.yaml", overrides) as used:
        if overrides:
            logger.info("overrides for this run only: %s", used)
        try:
            run_stages(root, results)
        finally:  # also when a stage fails: the validation report and the rejects then say why
            publish_artifacts(root, results)
        write_json(root / layout.RUN_RECORD, {
            "flow_run": str(runtime.flow_run.name), "flow_run_id": str(runtime.flow_run.id), "started": started,
            "overrides": overrides, "params_used": used, "executed": [r["stage"] for r in results if r["executed"]]})
    return results


def run_stages(root: Path, results: list[dict]) -> None:
    """Every stage in order, each run only if stale; appends each stage's result to results."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    restored = lockfile.check_or_restore(root)
    if restored:
        logger.warning("%s", restored)
    # a run killed or cancelled mid-stage left that stage's outputs deleted: put them back first, so
    # the stage reruns only if its inputs changed, not because its outputs were lost
    status = status_with_retries(root)
    missing = stages_missing_outputs(status)
    for stage in missing:
        restore_outputs(root, stage)
    stale = set(status_with_retries(root) if missing else status)
    if not stale:
        logger.info("nothing changed since the last run (data, params and code as recorded in dvc.lock): "
                    "no stage will be re-executed")
    upstream_ran = False
    timeout = load_section("schedule", root / "params.yaml").stage_timeout_s
    for stage in STAGES:
        # A stage not stale at the start becomes stale only if an upstream stage re-executed.
        r = run_stage.with_options(timeout_seconds=timeout)(stage, str(root), maybe_stale=upstream_ran or stage in stale)
        upstream_ran |= r["executed"]
        results.append(r)
    executed = [r["stage"] for r in results if r["executed"]]
    logger.info("re-executed %d of %d stages in %.1fs: %s", len(executed), len(STAGES),
                time.perf_counter() - t0, ", ".join(executed) or "none")


if __name__ == "__main__":
    finetune()
