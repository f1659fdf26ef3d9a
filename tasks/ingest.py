"""ingest stage: read every raw source into one normalized table.

    python -m tasks.ingest      (or: dvc repro ingest)

Reads JSONL/JSON, CSV, Parquet files and saved `datasets` directories, in alpaca
(instruction/input/output), chat `messages`, or prompt/completion form (strings or message lists).
Each output row has a stable content-derived id, the conversation as role/content turns, and the
source file and line it came from. A row that cannot be understood is kept, with `ingest_error`
saying why, so that validation rejects it with its reason: nothing is dropped here.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from loraflow import layout
from loraflow.artifacts import write_parquet
from loraflow.errors import LoraflowError
from loraflow.params import IngestParams
from loraflow.text import squash
from loraflow.stage import main

log = logging.getLogger("loraflow.ingest")

COLUMNS = ["id", "content_hash", "near_key", "messages", "trainable_from", "format", "family", "source", "line",
           "ingest_error"]
FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


def conversation_id(messages: Any) -> str:
    """Content hash: the same conversation gets the same id wherever and whenever it is read,
    which keeps the train/eval split stable when rows are added or reordered."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def near_duplicate_key(messages: list[dict]) -> str:
    """Equal for conversations that differ only in letter case and whitespace."""
    squashed = [[str(t.get("role")), squash(str(t.get("content")))] for t in messages]
    return conversation_id(squashed)


def _turns_from_value(value: Any, default_role: str) -> list[dict] | None:
    """A prompt or completion is either a string or already a list of turns."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return [dict(t) if isinstance(t, dict) else {"role": None, "content": t} for t in value]
    return None


def normalize(record: Any) -> tuple[str, list[dict] | None, str | None]:
    """(format, messages, error) for one raw record in any supported form. For prompt/completion
    rows, the completion's turns are the last len(completion) messages (see `completion_turns`)."""
    if not isinstance(record, dict):
        return "unknown", None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        if isinstance(msgs, str):  # CSV cells hold JSON text
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                return "chat", None, f"messages is not valid JSON: {e.msg}"
        if hasattr(msgs, "tolist"):  # Parquet/Arrow arrays
            msgs = msgs.tolist()
        if not isinstance(msgs, list):
            return "chat", None, f"messages must be a list of turns, got {type(msgs).__name__}"
        return "chat", [dict(t) if isinstance(t, dict) else {"role": None, "content": t} for t in msgs], None
    if "instruction" in record or "output" in record:
        missing = [k for k in ("instruction", "output") if k not in record or record[k] is None]
        if missing:
            return "alpaca", None, f"missing field(s): {', '.join(missing)}"
        instruction, extra = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str) or not isinstance(record["output"], str):
            return "alpaca", None, "instruction, input and output must be strings"
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return "alpaca", [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}], None
    if "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if k not in record or record[k] is None]
        if missing:
            return "prompt_completion", None, f"missing field(s): {', '.join(missing)}"
        prompt = _turns_from_value(record["prompt"], "user")
        completion = _turns_from_value(record["completion"], "assistant")
        if prompt is None or completion is None:
            return "prompt_completion", None, "prompt and completion must be strings or lists of turns"
        return "prompt_completion", prompt + completion, None
    return "unknown", None, ("no recognised fields: expected 'messages', 'instruction'+'output', or "
                             f"'prompt'+'completion'; found {sorted(record)[:8]}")


def completion_turns(record: dict) -> int | None:
    """How many trailing turns are the completion of a prompt/completion record (None: other forms)."""
    if not isinstance(record, dict) or "messages" in record or "prompt" not in record:
        return None
    completion = record.get("completion")
    return len(completion) if isinstance(completion, list) else 1


def _records_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 (byte {e.start}): re-encode the file as UTF-8"
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue  # blank lines separate nothing and hold no row
            if "\x00" in text or "\\u0000" in text:
                yield lineno, None, "contains NUL bytes (binary data?): remove them from the line"
                continue
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"malformed JSON at column {e.colno}: {e.msg}"


FORMS = ({"messages"}, {"instruction", "output"}, {"prompt", "completion"})


def _records_table(df: pd.DataFrame, first_line: int, path: Path) -> Iterator[tuple[int, Any, str | None]]:
    # A table's columns are its schema: if they match no form, every row would fail the same way.
    if not any(form <= set(df.columns) for form in FORMS) and not ({"instruction"} & set(df.columns)):
        raise LoraflowError(f"{path}: columns {sorted(map(str, df.columns))} match no supported form; expected "
                            "'messages', or 'instruction' + 'output' (+ 'input'), or 'prompt' + 'completion'. "
                            "Rename the columns or convert the file.")
    for i, rec in enumerate(df.to_dict(orient="records")):
        yield first_line + i, {k: (None if _is_missing(v) else v) for k, v in rec.items()}, None


def _is_missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False  # lists/arrays are values, not missing


def read_source(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line or row number, record, read error) for every record of one file or directory."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise LoraflowError(f"{path}: a DatasetDict; point sources at one split, e.g. {path}/train")
            yield from _records_table(ds.to_pandas(), 0, path)
            return
        raise LoraflowError(f"{path}: a directory, but not a saved `datasets` directory (no dataset_info.json)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and path.read_bytes().lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
            yield from _records_table(pd.DataFrame(json.loads(path.read_text(encoding="utf-8-sig"))), 0, path)
            return
        yield from _records_jsonl(path)
    elif suffix == ".csv":
        # Line 1 is the header; quoted fields may span lines, so this is the record's row number + 1.
        yield from _records_table(pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[]), 2, path)
    elif suffix == ".parquet":
        yield from _records_table(pd.read_parquet(path), 0, path)
    else:
        raise LoraflowError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(FILE_SUFFIXES)} "
                            "or a saved datasets directory")


def ingest(sources: list[str], system_prompt: str | None = None) -> pd.DataFrame:
    rows, seen = [], Counter()
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise LoraflowError(f"ingest.sources: {src} does not exist. Fix the path in params.yaml.")
        before = len(rows)
        for line, record, error in read_source(path):
            fmt, messages, norm_error = ("unknown", None, error) if error else normalize(record)
            if messages is not None and system_prompt and not any(t.get("role") == "system" for t in messages):
                messages = [{"role": "system", "content": system_prompt}, *messages]
            own_id = record.get("id") if isinstance(record, dict) else None
            family = record.get("family") if isinstance(record, dict) else None
            n_completion = completion_turns(record) if messages is not None else None
            content_hash = conversation_id(messages if messages is not None else [src, line])
            seen[content_hash] += 1
            # a repeat of the same content gets its own id; validation still sees it as a duplicate
            derived_id = content_hash if seen[content_hash] == 1 else f"{content_hash}-{seen[content_hash]}"
            rows.append({
                "id": str(own_id) if own_id is not None else derived_id,
                "content_hash": content_hash,
                "near_key": near_duplicate_key(messages) if messages is not None else content_hash,
                "messages": json.dumps(messages, ensure_ascii=False) if messages is not None else None,
                # index of the first turn that may be trained: the completion's, or any turn
                "trainable_from": len(messages) - n_completion if n_completion else 0,
                "format": fmt, "family": str(family) if family is not None else "",
                "source": src, "line": int(line), "ingest_error": norm_error,
            })
        log.info("%s: %d rows", src, len(rows) - before)
        if len(rows) == before:
            raise LoraflowError(f"{src}: no rows found. Is the file empty?")
    return pd.DataFrame(rows, columns=COLUMNS)


def run(params: IngestParams) -> dict:
    df = ingest(params.sources, params.system_prompt)
    write_parquet(layout.INGESTED, df)
    return {"rows": len(df), "per_source": df.groupby("source").size().to_dict(),
            "per_format": df.groupby("format").size().to_dict(),
            "unparsed": int(df["ingest_error"].notna().sum())}


if __name__ == "__main__":
    main("ingest", run)
