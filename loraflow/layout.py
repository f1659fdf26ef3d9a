"""Where every stage reads and writes, relative to the project root. dvc.yaml names the same paths
(tests/test_layout.py keeps the two in step)."""
import re
from pathlib import Path

STAGES = ("base", "ingest", "validate", "template", "tokenize", "train", "merge", "evaluate", "promote", "lineage")
"""The pipeline's stages in run order: the one list. dvc.yaml's stages, the flow's tasks and the params
sections follow it (tests/test_layout.py checks each)."""

BASE_CORPUS = Path("data/base_corpus.txt")
BASE_DIR = Path("models/base")
BUILD_INFO = BASE_DIR / "build_info.json"  # written only for the bundled base, which is built here

INGESTED = Path("data/interim/ingested.parquet")
VALIDATED = Path("data/interim/validated.parquet")
REJECTS = Path("data/interim/rejects.jsonl")
VALIDATION_JSON = Path("reports/validation.json")
VALIDATION_MD = Path("reports/validation.md")

TEMPLATED = Path("data/interim/templated.parquet")
TEMPLATE_REJECTS = Path("data/interim/template_rejects.jsonl")
CHAT_FORMAT = Path("data/interim/chat_format.json")  # the chat template and end-of-turn every later stage uses

TOKENS_DIR = Path("data/processed")
TRAIN_TOKENS = TOKENS_DIR / "train.parquet"
EVAL_TOKENS = TOKENS_DIR / "eval.parquet"
GOLDEN_TOKENS = TOKENS_DIR / "golden.parquet"  # ingest.golden_sources' rows: scored, never trained on
GOLDEN_SOURCE = "golden:"  # the source label's prefix that marks a golden row from ingest to tokenize
TOKENIZE_REJECTS = TOKENS_DIR / "rejects.jsonl"
# DVC warns "'<out>' is empty." for any empty output; an empty rejects file is the clean case, so
# `loraflow repro`, `make run` and the flow's log leave that warning out (and only that one).
EMPTY_REJECTS_WARNING = re.compile(r"^WARNING: '[^']*rejects\.jsonl' is empty\.$")
MASK_AUDIT_JSON = Path("reports/mask_audit.json")
MASK_AUDIT_MD = Path("reports/mask_audit.md")
MASK_AUDIT_ROWS = Path("reports/mask_audit_rows.csv")
MASK_AUDIT_PNG = Path("reports/mask_audit.png")

ADAPTER_DIR = Path("models/adapter")
CHECKPOINTS_DIR = Path("models/checkpoints")
LAUNCH_DIR = Path("models/launch")  # the params and accelerate config of a multi-GPU train run (scratch)
LOSS_CSV = Path("reports/train_loss.csv")
LOSS_PNG = Path("reports/train_loss.png")
TRAIN_LIVE = Path("reports/train_live")  # DVCLive's live metrics and plots of the train stage
MEMORY_PLAN_MD = Path("reports/memory_plan.md")
MEMORY_PLAN_JSON = Path("reports/memory_plan.json")
PLAN_PREVIEW_MD = Path("reports/memory_plan_preview.md")
PLAN_PREVIEW_JSON = Path("reports/memory_plan_preview.json")

MERGED_DIR = Path("models/merged")
MERGE_CHECK = Path("reports/merge_check.json")

METRICS = Path("reports/metrics.json")  # everything evaluate measured and how (a plain output)
# the measurements alone, one file per model, as DVC's metrics: `dvc metrics show -R reports/scores`
# is one row per model and fits an 80-column terminal
SCORES_DIR = Path("reports/scores")
SCORE_KEYS = ("exact_match", "rouge1", "rouge2", "rougeL")
GENERATIONS = Path("reports/generations.jsonl")
GENERATION_AUDIT = Path("reports/generation_audit.md")

PROMOTED_DIR = Path("models/promoted")
PROMOTION_JSON = Path("reports/promotion.json")
PROMOTION_MD = Path("reports/promotion.md")
DATA_CHANGES_JSON = Path("reports/data_changes.json")  # the training data since the champion's (promote)
DATA_CHANGES_MD = Path("reports/data_changes.md")

LINEAGE = Path("reports/lineage.json")
RUN_RECORD = Path("reports/last_flow_run.json")  # written by the Prefect flow: its name, overrides, what it ran

STAGE_SUMMARIES = Path("reports/stages")


def stage_summary(stage: str) -> Path:
    return STAGE_SUMMARIES / f"{stage}.json"
