"""Run-time parameter overrides: dotted keys into params.yaml, checked before any stage runs.

    loraflow run -S train.lr=0.001 -S evaluate.max_rows=50
    prefect deployment run 'finetune/nightly' --param overrides='{"train.lr": 0.001}'

An accepted override is written into params.yaml (comments kept) for the run, as `dvc exp run -S`
does, so DVC sees it as a parameter change of the stages that own the key and reruns them; when the
run ends, however it ends, params.yaml is put back (for_this_run), so the next run (the nightly
schedule) does not inherit it. A bad key or value fails at once, naming it, and leaves params.yaml
untouched.
"""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any

import yaml

from loraflow.artifacts import write_text
from loraflow.params import SECTIONS, ParamsError, validate_all


def parse_cli(assignments: list[str]) -> dict[str, Any]:
    """`key=value` strings, values read as YAML (so 0.001, true, [a, b] keep their types)."""
    out = {}
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"override {a!r}: expected section.key=value, e.g. train.lr=0.001")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _set(tree: dict, dotted: str, value: Any, problems: list[str]) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        problems.append(f"{dotted}: not a parameter (use section.key with a section of: {', '.join(SECTIONS)})")
        return
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"{dotted}: {part} is not a section")
            return
        node = child
    node[parts[-1]] = value


def check(params_path: Path | str, overrides: dict[str, Any]) -> dict:
    """The params mapping with overrides applied; raises ParamsError naming every bad key or value."""
    params_path = Path(params_path)
    data = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    merged, problems = copy.deepcopy(data), []
    for key, value in overrides.items():
        _set(merged, key, value, problems)
    if problems:
        raise ParamsError("invalid overrides:\n  " + "\n  ".join(problems))
    try:
        # keys only: a value may be what the check refuses (a secret), and errors are printed and logged
        validate_all(merged, f"{params_path} with overrides of {', '.join(overrides)}")
    except ParamsError as e:
        raise ParamsError(str(e)) from None
    return merged


def apply(params_path: Path | str, overrides: dict[str, Any]) -> None:
    """Check, then write the overrides into params.yaml keeping its comments and layout."""
    check(params_path, overrides)
    if not overrides:
        return
    from ruamel.yaml import YAML  # comment-preserving round trip (a dvc dependency)

    ry = YAML()
    ry.preserve_quotes = True
    doc = ry.load(Path(params_path).read_text(encoding="utf-8"))
    for key, value in overrides.items():
        _set(doc, key, value, [])
    buf = io.StringIO()
    ry.dump(doc, buf)
    write_text(params_path, buf.getvalue(), redact_secrets=False)


def values_of(merged: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    """Each overridden key's value as the run reads it."""
    out = {}
    for key in overrides:
        node = merged
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


@contextlib.contextmanager
def for_this_run(params_path: Path | str, overrides: dict[str, Any]):
    """Apply the overrides for the body only: params.yaml's exact text is written back on the way out,
    on success, failure, timeout or KeyboardInterrupt. Yields the values the run uses."""
    params_path = Path(params_path)
    merged = check(params_path, overrides)
    if not overrides:
        yield {}
        return
    original = params_path.read_text(encoding="utf-8")
    try:
        apply(params_path, overrides)
        yield values_of(merged, overrides)
    finally:
        write_text(params_path, original, redact_secrets=False)
