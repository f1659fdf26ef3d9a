"""ingest stage: read every raw source into one normalized table.

    python -m tasks.ingest      (or: dvc repro ingest)

Reads JSONL/JSON, CSV, Parquet files (each also gzip-compressed, `.gz`), saved `datasets` directories
and `datasets` names (`{dataset: org/name}` through load_dataset), in alpaca (instruction/input/output),
chat `messages` (OpenAI-style content parts and capitalised roles included), ShareGPT `conversations`
(from/value, human/gpt/system), or prompt/completion form (strings or message lists). Per source,
`max_rows` and `weight` take a deterministic sample (by a hash of each row's id), for mixing.
Each output row has a stable content-derived id, the conversation as role/content turns, and the
source file and line it came from. A row that cannot be understood is kept, with `ingest_error`
saying why, so that validation rejects it with its reason: nothing is dropped here.
"""
from __future__ import annotations

import gzip
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
from loraflow.params import IngestParams, Source
from loraflow.secrets import MASK, TOKEN_SHAPES
from loraflow.text import squash
from loraflow.stage import main

log = logging.getLogger("loraflow.ingest")

COLUMNS = ["id", "content_hash", "near_key", "messages", "trainable_from", "format", "family", "source", "line",
           "ingest_error"]
FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
# ShareGPT's speaker names (and other exporters'), mapped to chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


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
        return [_turn(t) for t in value]
    return None


def _turn(raw: Any) -> dict:
    """One turn as {role, content}: roles lower-cased and trimmed ("User" is "user"), OpenAI-style
    content parts ([{"type": "text", "text": ...}]) joined. A part that is not text stays a list, which
    validation rejects as not a string, with its reason."""
    if not isinstance(raw, dict):
        return {"role": None, "content": raw}
    turn = dict(raw)
    if isinstance(turn.get("role"), str):
        turn["role"] = turn["role"].strip().lower()
    content = turn.get("content")
    if hasattr(content, "tolist"):  # Parquet/Arrow arrays
        content = content.tolist()
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        turn["content"] = "".join(str(p.get("text", "")) for p in content)
    return turn


def _sharegpt_turns(conversations: list) -> list[dict]:
    turns = []
    for t in conversations:
        if not isinstance(t, dict):
            turns.append({"role": None, "content": t})
            continue
        speaker = str(t.get("from", "")).strip().lower()
        turns.append({"role": SHAREGPT_ROLES.get(speaker, speaker), "content": t.get("value")})
    return turns


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
        return "chat", [_turn(t) for t in msgs], None
    if "conversations" in record:
        convs = record["conversations"]
        if isinstance(convs, str):
            try:
                convs = json.loads(convs)
            except json.JSONDecodeError as e:
                return "sharegpt", None, f"conversations is not valid JSON: {e.msg}"
        if hasattr(convs, "tolist"):
            convs = convs.tolist()
        if not isinstance(convs, list):
            return "sharegpt", None, f"conversations must be a list of turns, got {type(convs).__name__}"
        return "sharegpt", _sharegpt_turns(convs), None
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
    with _open_binary(path) as f:
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
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, None, f"malformed JSON at column {e.colno}: {e.msg}"
                continue
            except RecursionError:
                yield lineno, None, "JSON nested too deeply to be a conversation"
                continue
            surrogate = _lone_surrogate(record)
            yield (lineno, None, surrogate) if surrogate else (lineno, record, None)


def _lone_surrogate(record: Any) -> str | None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which is no character: no UTF-8 writer takes it."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds an invalid character (a lone UTF-16 surrogate, {e.object[e.start:e.end]!a}): fix the escape"
    return None


FORMS = ({"messages"}, {"conversations"}, {"instruction", "output"}, {"prompt", "completion"})


def _records_table(df: pd.DataFrame, lines: int | list[int], path: Path,
                   columns: dict[str, str] | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """The table's rows as records; `lines` is each row's line in the file (or the first row's number)."""
    columns = columns or {}
    absent = sorted(set(columns) - set(map(str, df.columns)))
    if absent:
        raise LoraflowError(f"{path}: ingest.sources maps column(s) {absent}, which the file does not have; "
                            f"its columns are {sorted(map(str, df.columns))}")
    df = df.rename(columns=columns)
    # A table's columns are its schema: if they match no form, every row would fail the same way.
    if not any(form <= set(df.columns) for form in FORMS) and not ({"instruction"} & set(df.columns)):
        raise LoraflowError(f"{path}: columns {sorted(map(str, df.columns))} match no supported form; expected "
                            "'messages', or 'instruction' + 'output' (+ 'input'), or 'prompt' + 'completion'. "
                            "Map your column names in params.yaml (ingest.sources: - {path: ..., columns: "
                            "{question: instruction, answer: output}}), or convert the file.")
    # a missing cell is an absent field: a table that mixes forms (as load_dataset unifies them) has
    # every form's columns, and a row's own form is the one whose fields it fills
    for i, rec in enumerate(df.to_dict(orient="records")):
        line = lines[i] if isinstance(lines, list) else lines + i
        yield line, {k: v for k, v in rec.items() if not _is_missing(v)}, None


def csv_record_lines(path: Path) -> list[int]:
    """The physical line each CSV record starts on (line 1 is the header): a quoted field may span
    lines, so the record number is not the line an editor shows. Blank lines hold no record, as in
    pandas."""
    import csv
    import io
    starts, end = [], 0
    with _open_binary(path) as f:
        reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
        for row in reader:
            first, end = end + 1, reader.line_num
            if row and first > 1:
                starts.append(first)
    return starts


def _is_missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False  # lists/arrays are values, not missing


def _data_suffix(path: Path) -> str:
    """The file type, looking through a .gz compression suffix."""
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix == ".gz" else suffix


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def read_dataset(source: Source) -> Iterator[tuple[int, Any, str | None]]:
    """Rows of a `datasets` dataset by name, through load_dataset (the hub, or its local cache offline)."""
    import datasets
    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, not found, bad split)
        raise LoraflowError(f"ingest.sources: dataset {source.dataset!r} (split {source.split!r}) could not be "
                            f"loaded: {str(e).splitlines()[0]}") from None
    yield from _records_table(ds.to_pandas(), 0, Path(source.label), source.columns)


def read_source(path: Path, columns: dict[str, str] | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """(line or row number, record, read error) for every record of one file or directory. A file
    that cannot be read as a whole (a truncated JSON array, a CSV row of the wrong width, a file that
    is not UTF-8, a corrupt Parquet file) is one clear error naming the file and the fix."""
    try:
        yield from _read_source(path, columns)
    except LoraflowError:
        raise
    except UnicodeDecodeError as e:
        raise LoraflowError(f"{path}: not UTF-8 (byte {e.start}): re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise LoraflowError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); a truncated "
                            "file? Fix it, or write one object per line (JSONL) so one bad line is one reject") from None
    except RecursionError:
        raise LoraflowError(f"{path}: JSON nested too deeply to be conversations") from None
    except pd.errors.ParserError as e:
        raise LoraflowError(f"{path}: not a well-formed CSV file ({str(e).strip()}); every row needs the header's "
                            "number of fields (quote fields that hold commas)") from None
    except (OSError, ValueError, EOFError) as e:  # ArrowInvalid is a ValueError; a cut .gz an EOFError
        raise LoraflowError(f"{path}: could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "is the file complete and of the type its name says?") from None


def rename_fields(record: Any, columns: dict[str, str]) -> Any:
    """A JSON record with its fields renamed as ingest.sources' `columns` says."""
    return {columns.get(k, k): v for k, v in record.items()} if isinstance(record, dict) else record


def _read_source(path: Path, columns: dict[str, str] | None = None) -> Iterator[tuple[int, Any, str | None]]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise LoraflowError(f"{path}: a DatasetDict; point sources at one split, e.g. {path}/train")
            yield from _records_table(ds.to_pandas(), 0, path, columns)
            return
        raise LoraflowError(f"{path}: a directory, but not a saved `datasets` directory (no dataset_info.json)")
    suffix = _data_suffix(path)
    if suffix in (".jsonl", ".json"):
        if suffix == ".json":
            with _open_binary(path) as f:
                data = f.read()
            if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
                yield from _records_table(pd.DataFrame(json.loads(data.decode("utf-8-sig"))), 0, path, columns)
                return
        for line, record, error in _records_jsonl(path):
            yield line, (rename_fields(record, columns) if columns else record), error
    elif suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], compression="infer")
        lines = csv_record_lines(path)
        # a dialect the csv module reads otherwise than pandas: record numbers (line 1 the header) then
        yield from _records_table(df, lines if len(lines) == len(df) else 2, path, columns)
    elif suffix == ".parquet":
        yield from _records_table(pd.read_parquet(path), 0, path, columns)
    else:
        raise LoraflowError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(FILE_SUFFIXES)} "
                            "or a saved datasets directory")


SECRET_FOUND = ("held a token-shaped secret (hf_..., sk-..., ghp_..., AKIA...), masked in every output and "
                "rejected: remove it from the source data")


def mask_secrets(messages: list[dict] | None, record: Any) -> tuple[list[dict] | None, Any, str | None]:
    """Token-shaped secrets in a row's turns or id are masked before anything is written (the row then
    never reaches a Parquet file, a report or dvc.lock as it was) and the row is rejected, saying why."""
    found = False
    if messages is not None:
        text = json.dumps(messages, ensure_ascii=False)
        if TOKEN_SHAPES.search(text):
            messages, found = json.loads(TOKEN_SHAPES.sub(MASK, text)), True
    if isinstance(record, dict) and isinstance(record.get("id"), str) and TOKEN_SHAPES.search(record["id"]):
        record, found = {**record, "id": TOKEN_SHAPES.sub(MASK, record["id"])}, True
    return messages, record, SECRET_FOUND if found else None


def records_of(source: Source) -> Iterator[tuple[int, Any, str | None]]:
    if source.dataset is not None:
        return read_dataset(source)
    path = Path(source.path)
    if not path.exists():
        raise LoraflowError(f"ingest.sources: {source.path} does not exist. Fix the path in params.yaml.")
    return read_source(path, source.columns)


def sample(rows: list[dict], source: Source) -> list[dict]:
    """The source's rows cut to max_rows, then to weight x that many: the rows whose hash of their id is
    smallest, so the same rows are taken on every run and a row's presence does not depend on its order."""
    keep = len(rows) if source.max_rows is None else min(len(rows), source.max_rows)
    keep = round(keep * source.weight)
    if keep >= len(rows):
        return rows
    chosen = set(sorted(range(len(rows)), key=lambda i: hashlib.sha256(rows[i]["id"].encode()).digest())[:keep])
    return [r for i, r in enumerate(rows) if i in chosen]


def ingest(sources: list[str | Source], system_prompt: str | None = None,
           golden_sources: list[str | Source] = ()) -> pd.DataFrame:
    """Every source's rows in one table. Golden sources come first, their source labelled
    `golden:<path>` (layout.GOLDEN_SOURCE), which later stages carry and tokenize sets apart."""
    rows, seen, read_per_source = [], Counter(), {}
    for prefix, given in [(layout.GOLDEN_SOURCE, g) for g in golden_sources] + [("", s) for s in sources]:
        source = given if isinstance(given, Source) else Source(path=given)
        src = prefix + source.label
        before = len(rows)
        for line, record, error in records_of(source):
            fmt, messages, norm_error = ("unknown", None, error) if error else normalize(record)
            messages, record, secret = mask_secrets(messages, record)
            norm_error = norm_error or secret
            if messages is not None and system_prompt and not any(t.get("role") == "system" for t in messages):
                messages = [{"role": "system", "content": system_prompt}, *messages]
            own_id = record.get("id") if isinstance(record, dict) else None
            # a `family` or `task` column groups rows for per-family scoring
            family = (record.get("family", record.get("task")) if isinstance(record, dict) else None)
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
        if len(rows) == before:
            raise LoraflowError(f"{src}: no rows found. Is the file empty?")
        read = read_per_source[src] = len(rows) - before
        rows[before:] = sample(rows[before:], source)
        log.info("%s: %d rows%s", src, len(rows) - before,
                 f" sampled of {read} (max_rows {source.max_rows}, weight {source.weight})" if len(rows) - before < read else "")
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["read_per_source"] = read_per_source  # before sampling: the summary says what was left out
    return table


def check_sources_are_dependencies(sources: list[str | Source], dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Every file source must lie under one of the ingest stage's deps in dvc.yaml, or DVC would not
    see it change and the results would go stale silently."""
    if not dvc_yaml.exists():
        return  # run outside a DVC project (tests, a notebook): nothing to keep in step
    import yaml
    deps = [Path(d).resolve() for d in yaml.safe_load(dvc_yaml.read_text())["stages"]["ingest"].get("deps", [])]
    for given in sources:
        path = given.path if isinstance(given, Source) else given
        if path is None:
            continue  # a datasets name: pin its revision to make it reproducible
        where = Path(path).resolve()
        if not any(where == d or d in where.parents for d in deps):
            raise LoraflowError(f"ingest.sources: {path} is not under the ingest stage's dependencies in dvc.yaml "
                                "(data/raw), so DVC would not rerun when it changes. Move it into data/raw, or add "
                                "it to the ingest stage's deps in dvc.yaml")


def run(params: IngestParams) -> dict:
    check_sources_are_dependencies(params.sources + params.golden_sources)
    df = ingest(params.sources, params.system_prompt, params.golden_sources)
    read = df.attrs.pop("read_per_source")
    write_parquet(layout.INGESTED, df)
    kept = df.groupby("source").size().to_dict()
    sampled_out = {src: n - kept.get(src, 0) for src, n in read.items() if n > kept.get(src, 0)}
    return {"rows": len(df), "per_source": kept, "sampled_out_per_source": sampled_out,
            "per_format": df.groupby("format").size().to_dict(),
            "unparsed": int(df["ingest_error"].notna().sum())}


if __name__ == "__main__":
    main("ingest", run)
