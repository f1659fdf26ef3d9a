"""The lineage of a workspace's results: raw data -> validated -> tokens -> adapter -> merged -> metrics
by DVC's own content hashes (read from dvc.lock), with each stage's params, the code version and the
base model. The lineage stage writes it to reports/lineage.json; `loraflow lineage` prints it.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from loraflow import layout
from loraflow.modeling import REFERENCE_FILE

# (link name, stage that writes it, path) in pipeline order
CHAIN = [
    ("raw", "ingest", "data/raw"),
    ("ingested", "ingest", str(layout.INGESTED)),
    ("validated", "validate", str(layout.VALIDATED)),
    ("train_tokens", "tokenize", str(layout.TRAIN_TOKENS)),
    ("eval_tokens", "tokenize", str(layout.EVAL_TOKENS)),
    ("adapter", "train", str(layout.ADAPTER_DIR)),
    ("merged", "merge", str(layout.MERGED_DIR)),
    ("metrics", "evaluate", str(layout.METRICS)),
    ("promotion", "promote", str(layout.PROMOTION_JSON)),
]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version() -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def environments() -> dict[str, dict | None]:
    """Each stage's environment as its summary recorded it (loraflow.stage.environment): stages handed
    on through DVC may have run on other machines or releases than this one."""
    found = {}
    for stage in layout.STAGES[:-1]:  # all but lineage itself, whose summary is written after this
        path = layout.stage_summary(stage)
        found[stage] = json.loads(path.read_text()).get("environment") if path.exists() else None
    return found


def machines(envs: dict[str, dict | None]) -> list[dict]:
    """The machines the stages ran on (processor and GPU), in pipeline order, each with its stages and
    the versions of every library those stages loaded (more than one version: upgraded between stages)."""
    found: dict[tuple, dict] = {}
    for stage, env in envs.items():
        if env is None:
            continue
        machine = found.setdefault((env["cpu"], env.get("gpu")), {"cpu": env["cpu"], "gpu": env.get("gpu"),
                                                                  "stages": [], "packages": {}})
        machine["stages"].append(stage)
        for lib, version in env["packages"].items():
            machine["packages"].setdefault(lib, [])
            if version not in machine["packages"][lib]:
                machine["packages"][lib].append(version)
    return list(found.values())


def base_model() -> dict:
    ref = layout.BASE_DIR / REFERENCE_FILE
    if ref.exists():
        info = json.loads(ref.read_text())
        return {"id": info["source"], "revision": info.get("revision"), "content_sha256": info.get("content_sha256")}
    build = layout.BUILD_INFO
    return {"id": "bundled", "revision": None,
            "build": json.loads(build.read_text()) if build.exists() else None}


def warm_start() -> dict | None:
    """The adapter the trained one continued (train.init_from), with its content hash; None: a fresh one."""
    info = layout.ADAPTER_DIR / "train_info.json"
    return json.loads(info.read_text()).get("init_from") if info.exists() else None


def hashes(entries: list[dict]) -> dict[str, str]:
    return {e["path"]: e.get("md5") or e.get("hash") for e in entries or []}


def build(lock_path: Path = Path("dvc.lock")) -> dict:
    stages = yaml.safe_load(lock_path.read_text())["stages"]
    links = []
    for name, stage, path in CHAIN:
        entry = stages.get(stage, {})
        found = hashes(entry.get("outs")) | hashes(entry.get("deps"))
        links.append({"name": name, "path": path, "md5": found.get(path), "stage": stage})
    params = {s: next(iter(v.get("params", {}).values()), {}).get(s) for s, v in stages.items() if v.get("params")}
    metrics = json.loads(layout.METRICS.read_text()) if layout.METRICS.exists() else None
    promotion = json.loads(layout.PROMOTION_JSON.read_text()) if layout.PROMOTION_JSON.exists() else None
    return {"chain": links, "code": code_version(), "environments": environments(), "base_model": base_model(), "warm_start": warm_start(), "params": params,
            "metrics": {m: metrics[m] for m in ("base", "tuned")} if metrics else None,
            "promoted": promotion["promoted"] if promotion else None}


def describe(lineage: dict) -> str:
    lines = [f"code      {lineage['code']['git_commit']}{' (dirty)' if lineage['code']['dirty'] else ''}",
             f"base      {lineage['base_model']['id']} @ {lineage['base_model']['revision'] or '-'}"]
    if lineage.get("warm_start"):
        parent = lineage["warm_start"]
        lines.append(f"parent    {parent['sha256'][:12]}  {parent['path']}  (train.init_from: the adapter continued)")
    for link in lineage["chain"]:
        lines.append(f"{link['name']:<13} {(link['md5'] or 'missing')[:12]}  {link['path']}  (stage {link['stage']})")
    if lineage["metrics"]:
        t, b = lineage["metrics"]["tuned"], lineage["metrics"]["base"]
        lines.append(f"metrics   tuned exact_match {t['exact_match']} rougeL {t['rougeL']} | base {b['exact_match']} / {b['rougeL']}")
    lines.append(f"promoted  {lineage['promoted']}")
    for machine in machines(lineage.get("environments") or {}):
        libs = " ".join(f"{lib} {'/'.join(machine['packages'][lib])}" for lib in ("torch", "transformers", "peft", "trl")
                        if lib in machine["packages"])
        lines.append(f"ran on    {machine['cpu']}{' + ' + machine['gpu'] if machine['gpu'] else ''}"
                     f"{' | ' + libs if libs else ''}  ({', '.join(machine['stages'])})")
    return "\n".join(lines)
