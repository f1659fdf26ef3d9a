"""Atomic outputs and content hashes.

Every stage output goes through `atomic_path`: it is written beside its final place under a
temporary name and renamed in one step, so a killed stage never leaves a file or directory that
looks finished. Text reports pass through `redact`, so no token or secret reaches them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from loraflow.faults import maybe_die
from loraflow.secrets import redact


@contextlib.contextmanager
def atomic_path(final: Path | str, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success, replace `final` with it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        maybe_die(f"rename:{final}")
        _readable_like_any_output(tmp)
        if final.is_dir() and not final.is_symlink():
            # os.replace cannot swap a non-empty directory: move the old one aside first.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp)


def _readable_like_any_output(path: Path) -> None:
    """Every output gets the mode a plain file of this process gets (0644 under the usual umask): some
    writers (temporary files, safetensors) leave weights at 0600, unreadable to a colleague sharing the
    workspace or a DVC cache."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _remove_leftovers(final: Path) -> None:
    """Temporary siblings left by a killed writer (its pid is gone) are never results: delete them."""
    for p in final.parent.glob(f".{final.name}.*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def strict_json(obj: Any, **kwargs) -> str:
    """JSON that strict readers take: NaN and infinities (pandas' missing values) become null."""
    try:
        return json.dumps(obj, allow_nan=False, default=str, **kwargs)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, default=str, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


SPREADSHEET_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (=, +, -, @ first), quoted with a leading '."""
    return f"'{value}" if isinstance(value, str) and value.startswith(SPREADSHEET_FORMULA_STARTS) else value


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(redact(strict_json(obj, indent=2, sort_keys=False)) + "\n", encoding="utf-8")


def write_text(path: Path | str, text: str, redact_secrets: bool = True) -> None:
    """redact_secrets=False only for a file the user owns (params.yaml): we never change their values."""
    with atomic_path(path) as tmp:
        tmp.write_text(redact(text) if redact_secrets else text, encoding="utf-8")


def write_jsonl(path: Path | str, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(redact(strict_json(row, ensure_ascii=False)) + "\n")


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_parquet(path: Path | str, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path | str) -> str:
    """Hash of a file, or of a directory's relative paths and file contents."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()
