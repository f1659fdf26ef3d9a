"""dvc.lock survives a kill: DVC rewrites it in place, so a kill mid-write leaves it empty or
truncated, and every later `dvc status` or `dvc repro` fails ("dvc.lock validation failed").

Before a run, `check_or_restore` reads dvc.lock. If it parses, a copy is kept as the last good one
(.dvc/tmp/dvc.lock.good). If it does not, the last good copy is put back (what DVC last recorded
completely; stages finished since then rerun, which is safe) or, with none, the run stops with the
one-line fix.

    python -m loraflow.lockfile      (make run calls it before dvc repro)
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import yaml

from loraflow.errors import LoraflowError

LOCK = "dvc.lock"
GOOD_COPY = Path(".dvc/tmp/dvc.lock.good")


HASH = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


def _parses(path: Path) -> bool:
    """dvc.lock is whole: YAML whose every stage has its command, and every dependency and output a
    path, a complete md5 and a size (a cut can stop in the middle of any of them)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return False
    for stage in data["stages"].values():
        if not isinstance(stage, dict) or not isinstance(stage.get("cmd"), str):
            return False
        if any(key in stage and not isinstance(stage[key], (list, dict)) for key in ("deps", "outs", "params")):
            return False  # a key whose entries were cut off
        for entry in [*(stage.get("deps") or []), *(stage.get("outs") or [])]:
            if not (isinstance(entry, dict) and entry.get("path") and HASH.match(str(entry.get("md5", "")))
                    and "size" in entry):
                return False
    return True


def check_or_restore(root: Path | str = ".") -> str | None:
    """Keep a copy of a good dvc.lock, or put the last good one back; returns what it restored, if it did."""
    root = Path(root)
    lock, good = root / LOCK, root / GOOD_COPY
    if not lock.exists():
        return None  # nothing recorded yet: DVC writes it
    if _parses(lock):
        good.parent.mkdir(parents=True, exist_ok=True)
        tmp = good.with_name(good.name + ".tmp")
        shutil.copyfile(lock, tmp)
        tmp.replace(good)
        return None
    if good.exists() and _parses(good):
        shutil.copyfile(good, lock)
        return (f"{LOCK} was empty or truncated (a run killed while DVC wrote it): restored the last good copy "
                f"from {GOOD_COPY}; stages that finished after it will rerun")
    raise LoraflowError(f"{lock}: empty or truncated (a run killed while DVC wrote it) and no good copy was kept. "
                        f"Fix: git checkout {LOCK} (or delete it: every stage then reruns)")


def main() -> int:
    try:
        restored = check_or_restore(".")
    except LoraflowError as e:
        print(f"loraflow: error: {e}", file=sys.stderr)
        return 2
    if restored:
        print(f"loraflow: {restored}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
