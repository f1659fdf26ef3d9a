"""Generating and scoring as evaluation does, shared by the evaluate stage (the base and the fine-tuned
model) and the promotion gate (the champion, on the very same rows with the same settings), so the
two can never score differently.

Imports neither prefect, dvc nor pandera: both stages also run on minimal GPU machines.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

import loraflow
from loraflow import memplan
from loraflow.batch_invariant import unsupported_reason
from loraflow.chat_format import ChatFormat, strip_reasoning
from loraflow.generation import generate_texts
from loraflow.modeling import BaseRef, compute_dtype, device, fit_vocab, load_model, release_memory

log = logging.getLogger("loraflow.evaluate")
METRICS_DIR = Path(loraflow.__file__).resolve().parent / "metrics"  # shipped modules, loaded by path
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass(frozen=True)
class GenerationSettings:
    """How evaluation generated: written to reports/metrics.json, read back by the gate."""
    max_new_tokens: int
    batch_size: int | str
    strip_reasoning: bool

    @classmethod
    def of(cls, params) -> "GenerationSettings":
        return cls(params.max_new_tokens, params.batch_size, params.strip_reasoning)

    def to_dict(self) -> dict:
        return asdict(self)


def load_metric(name: str):
    import evaluate
    return evaluate.load(str(METRICS_DIR / name))


def eval_rows_sha256(rows: pd.DataFrame) -> str:
    """The content hash of the scored rows (ids, prompts, references): two scores compare only on the same hash."""
    h = hashlib.sha256()
    for r in rows[["id", "prompt", "reference"]].itertuples(index=False):
        h.update(json.dumps(list(r), ensure_ascii=False).encode())
    return h.hexdigest()


def load_for_generation(ref: BaseRef, tokenizer, adapter_dir: Path | None = None):
    """A model as evaluation runs it: its vocabulary grown to the tokenizer's (the base meets added
    tokens as the average token), with a PEFT adapter merged in when given, on the device."""
    model = load_model(ref, compute_dtype("auto"))
    fit_vocab(model, len(tokenizer))
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.to(device()).eval()


def generate_all(model, tokenizer, prompts: list[str], chat: ChatFormat, settings: GenerationSettings) -> list[dict]:
    """Greedy generations of every prompt (then the model is released)."""
    batch = generation_batch_size(model, tokenizer, prompts, settings)
    log.info("generating %d rows in batches of %d", len(prompts), batch)
    out = generate_texts(model, tokenizer, prompts, stop_ids=chat.stop_ids, end_of_turn=chat.end_of_turn,
                         max_new_tokens=settings.max_new_tokens, batch_size=batch)
    if settings.strip_reasoning:
        out = [{**o, "text": strip_reasoning(o["text"])} for o in out]
    del model
    release_memory()
    return out


def generation_batch_size(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> int:
    """settings.batch_size, or (auto) what the memory plan fits beside the loaded weights; 32 on CPU."""
    if settings.batch_size != "auto":
        return settings.batch_size
    if not torch.cuda.is_available():
        return 32
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return memplan.generation_batch(memplan.Arch.from_config(model.config), lengths, settings.max_new_tokens,
                                    torch.cuda.mem_get_info()[0], act_bytes=model.dtype.itemsize,
                                    ragged=unsupported_reason(model) is None)  # else HF generate pads each batch


def score_rows(outputs: list[str], references: list[str], checkable: list[bool], rouge, exact) -> dict[str, list]:
    """Each row's scores: the ROUGE F-measures, and exact match (1.0 or 0.0) where the row is
    checkable, None where it is not."""
    per_row = rouge.compute(predictions=outputs, references=references, use_aggregator=False)
    hits = exact.compute(predictions=outputs, references=references, use_aggregator=False)["exact_match"]
    return {**{k: list(per_row[k]) for k in ROUGE_KEYS},
            "exact_match": [h if c else None for h, c in zip(hits, checkable)]}


def rows_of(per_row: dict[str, list], rows: list[int]) -> dict[str, list]:
    """Per-row scores of the given rows only (one set of the rows a model was scored on)."""
    return {k: [v[i] for i in rows] for k, v in per_row.items()}


def aggregate(per_row: dict[str, list]) -> dict:
    """The means reports/metrics.json holds: ROUGE over every row, exact match over the checkable ones."""
    em = [v for v in per_row["exact_match"] if v is not None]
    rows = len(per_row["rougeL"])
    return {**{k: round(sum(per_row[k]) / max(rows, 1), 4) for k in ROUGE_KEYS},
            "exact_match": round(sum(em) / len(em), 4) if em else None, "exact_match_rows": len(em)}
