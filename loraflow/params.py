"""Typed sections of params.yaml. Each stage reads only its own section.

Every model forbids unknown keys, so a typo fails at load time with the key and the file named,
instead of silently falling back to a default. All problems are reported at once.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraflow.errors import LoraflowError
from loraflow.secrets import TOKEN_SHAPES

PARAMS_FILE = Path("params.yaml")


def at_least_one_or_auto(name: str):
    """A field validator: an int of at least 1, or "auto"."""
    def check(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"{name} must be at least 1, or auto")
        return v
    return field_validator(name)(classmethod(check))


class Section(BaseModel):
    # strict: a security switch takes a real boolean ("yes" is not true) and a number is not a boolean
    # (lr: true is not 1.0); no inf or nan, which pass `gt=0` and train an all-NaN adapter.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True,
                              allow_inf_nan=False)


class BundledBase(Section):
    """Shape of the locally built default base model (a small Llama)."""
    architecture: Literal["llama", "qwen3", "gemma3_text"] = "llama"
    """The decoder's transformers model type: Llama (default), or Qwen3 / Gemma-3 to run every stage
    on another family's modeling code offline."""
    vocab_size: int = Field(2048, ge=300)
    """Size of the BPE vocabulary trained on the bundled corpus."""
    hidden_size: int = Field(256, ge=16)
    """Width of the transformer."""
    num_layers: int = Field(4, ge=1)
    """Number of decoder layers."""
    num_heads: int = Field(4, ge=1)
    """Attention heads (key/value heads are half of them: grouped-query attention, as Llama 3)."""
    intermediate_size: int = Field(688, ge=16)
    """Width of the SwiGLU MLP."""
    pretrain_steps: int = Field(600, ge=0)
    """Full-parameter steps on data/base_corpus.txt so that the base knows the facts but not the chat format."""
    pretrain_lr: float = Field(3e-3, gt=0)
    """Learning rate of that pretraining."""
    seed: int = 0
    """Seed for tokenizer training order, weight init and pretraining."""

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_heads or self.num_heads % 2:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads must be even")
        return self


class BaseParams(Section):
    """Which base model to fine-tune."""
    source: str = "bundled"
    """'bundled' builds the small default locally; otherwise a local directory or a hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id; recorded in lineage."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you trust the model's authors."""
    bundled: BundledBase = BundledBase()
    """Shape of the bundled default; ignored for any other source."""


# What a raw row's fields may be named after ingest.sources' `columns` mapping.
SOURCE_FIELDS = {"messages", "conversations", "instruction", "input", "output", "prompt", "completion", "id",
                 "family", "task"}


class Source(Section):
    """One raw source given as a mapping: a file or directory (`path`) or a `datasets` name
    (`dataset`), and how many of its rows to take when mixing sources."""
    path: str | None = None
    """A file (.jsonl, .json, .csv, .parquet; .gz too) or a saved `datasets` directory."""
    dataset: str | None = None
    """A `datasets` name or local dataset script/directory for load_dataset, e.g. org/name (needs the hub,
    or its local cache with HF_DATASETS_OFFLINE=1)."""
    split: str = "train"
    """The split load_dataset reads (dataset sources only)."""
    config: str | None = None
    """The dataset's configuration name, if it has several (dataset sources only)."""
    revision: str | None = None
    """The dataset's revision (dataset sources only); recorded in lineage through the ingested table."""
    max_rows: int | None = Field(None, ge=1)
    """Take at most this many rows, a deterministic sample (by a hash of each row's id)."""
    weight: float = Field(1.0, gt=0, le=1)
    """Take this share of the source's rows (after max_rows), the same deterministic sample; for mixing
    a large source down beside a small one."""
    columns: dict[str, str] = {}
    """The source's own column (field) names for loraflow's, e.g. {question: instruction, answer: output,
    task: family, ticket_id: id}: the file is read as if its columns had those names."""

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]):
        unknown = sorted(set(v.values()) - SOURCE_FIELDS)
        if unknown:
            raise ValueError(f"maps to unknown field(s) {unknown}; the fields are {sorted(SOURCE_FIELDS)}")
        doubled = sorted({t for t in v.values() if list(v.values()).count(t) > 1})
        if doubled:
            raise ValueError(f"maps several columns to {doubled}")
        return v

    @model_validator(mode="after")
    def _one_origin(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of path or dataset")
        return self

    @property
    def label(self) -> str:
        """How rows name their source: the path, or dataset:NAME[:CONFIG]:SPLIT."""
        if self.path is not None:
            return self.path
        return ":".join(["dataset", self.dataset, *([self.config] if self.config else []), self.split])


class IngestParams(Section):
    """Raw inputs to normalize into one table."""
    sources: list[str | Source] = ["data/raw/alpaca.jsonl", "data/raw/chat.jsonl"]
    """Files or saved `datasets` directories (.jsonl, .json, .csv, .parquet, each also .gz), or mappings
    (Source) that name a `datasets` dataset or sample a source with max_rows / weight."""
    system_prompt: str | None = None
    """System turn prepended to rows that have none (None: leave rows as they are)."""
    golden_sources: list[str | Source] = []
    """A frozen golden set: files (or Source mappings) ingested, validated and templated like the
    rest, but never trained on and never part of the eval split. evaluate scores every golden row
    beside the eval rows, and the gate compares champion and challenger on them too. Read first, so
    a training row equal to a golden one is the duplicate that validation rejects."""

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("list at least one source")
        return v


class ValidateParams(Section):
    """Row-level checks on the ingested table."""
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    """Stop the run when more than this fraction of rows is rejected."""
    max_chars: int = Field(20000, gt=0)
    """Longest allowed content of one turn, in characters."""
    drop_duplicates: bool = True
    """Reject exact duplicate conversations after the first (rows with the same id always are)."""
    drop_near_duplicates: bool = True
    """Reject conversations equal to an earlier one up to letter case and whitespace."""


class TemplateParams(Section):
    """How conversations become text, and which of it is trained."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns are trainable in multi-turn rows."""
    chat_template: str = "tokenizer"
    """'tokenizer' (the model's own), a template shipped with loraflow for base checkpoints (chatml,
    llama3, gemma, mistral, phi3, qwen2.5; loraflow/templates/), or the path of a .jinja file."""
    end_of_turn: str | None = None
    """The text that ends an assistant turn; unset: read off the template (what it writes after an
    assistant turn's content). Trained after every assistant turn; generation stops on it."""
    date: str = "2026-01-01"
    """The date (YYYY-MM-DD, quoted) that templates printing today's date (Llama 3.x) render with:
    fixed, so the same data renders the same text on any day and the cache holds."""
    system_role: Literal["keep", "fold"] = "keep"
    """A system prompt under a template that has no system role (Gemma 2): keep (the row is rejected
    with the template's reason) or fold (prepended to the first user turn)."""
    reasoning: Literal["keep", "drop"] = "keep"
    """`<think>...</think>` in assistant answers: keep (trained where the template renders it; a
    template that drops past reasoning trains the answer only) or drop (removed before rendering)."""
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    """The stage fails when more rows than this share cannot be rendered or masked (each rejected row
    goes to data/interim/template_rejects.jsonl with its reason)."""
    add_tokens: Literal["auto"] | list[str] = "auto"
    """Tokens the template needs that the base tokenizer may lack: auto is the named template's own
    (loraflow/templates/tokens.json; none for 'tokenizer' or a .jinja file), or a list. Those
    missing are added as single tokens; train.trainable_tokens trains them."""
    control_tokens: Literal["reject", "escape"] = "reject"
    """Row content holding the tokenizer's control tokens (<|im_start|>, <|eot_id|>, ...) would be
    tokenized as the template's own tokens and could inject turns: reject the row (with the reason),
    or escape them (a word joiner, U+2060, after their first character, so they stay text)."""

    @field_validator("date", mode="before")
    @classmethod
    def _iso_date(cls, v):
        if isinstance(v, dt.date):  # YAML reads an unquoted 2026-01-01 as a date, which DVC cannot store
            raise ValueError(f'quote the date ("{v.isoformat()}"): DVC cannot read unquoted YAML dates')
        dt.date.fromisoformat(str(v))  # ValueError names the bad value
        return v

    @property
    def fixed_date(self) -> dt.date:
        return dt.date.fromisoformat(self.date)


class TokenizeParams(Section):
    """Token ids, labels and the split."""
    max_length: int = Field(256, ge=8)
    """Longest sequence in tokens."""
    overflow: Literal["drop", "truncate"] = "drop"
    """What to do with rows over max_length: drop them (counted), or cut them (counted)."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of rows in the held-out eval split, chosen by a hash of the row id."""
    split_seed: str = "loraflow"
    """Salt of that hash: change it to draw another split."""
    batch_size: int = Field(1000, ge=1)
    """Rows per call of the fast tokenizer."""
    leakage: Literal["remove", "fail", "keep"] = "remove"
    """Eval rows whose prompt is also a train prompt: remove them (to the rejects), stop the run, or keep them."""


class TrainParams(Section):
    """LoRA / QLoRA fine-tuning."""
    method: Literal["lora", "lora8", "qlora", "auto"] = "lora"
    """lora trains on the base in its dtype; lora8 loads the base in 8-bit and qlora in 4-bit nf4
    (bitsandbytes, GPU); auto lets the memory plan take the fastest of these that fits."""
    rank: int = Field(16, ge=1)
    """LoRA rank r."""
    alpha: float = Field(32, gt=0)
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer except the output head)."""
    modules_to_save: list[str] = []
    """Modules trained in full beside the adapter (e.g. [lm_head]); rarely needed: see trainable_tokens."""
    init_from: str = "base"
    """Where the adapter starts: base (a fresh adapter), promoted (continue the promoted adapter in
    models/promoted; a fresh one while nothing is promoted), or the path of a PEFT adapter. A parent
    must have this run's rank, alpha and trainable tokens; its hash goes into the checkpoint
    fingerprint and the lineage."""
    trainable_tokens: Literal["auto"] | list[str] = "auto"
    """Tokens whose embedding and output-head rows are trained beside the adapter (PEFT's
    trainable_token_indices), for a base that never learned the chat template's tokens. auto: the
    template stage's untrained_tokens (data/interim/chat_format.json): the template's tokens on a base
    checkpoint (a named or file template, or the bundled base), and any token it added; none for an
    instruct model on its own template. [] trains none."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (linear decay after warmup)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of steps spent warming up."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the train split."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""
    rows_per_step: int = Field(16, ge=1)
    """Rows per optimizer step, across all GPUs: the one batch size the math depends on. The memory
    plan splits it into micro-batches (train.micro_batch) and, with several GPUs, across processes;
    neither split changes the math, since the loss is normalized by the trained tokens of the whole step."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    seed: int = 0
    """Seed for LoRA init, dropout and data order."""
    save_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint every this many optimizer steps."""
    logging_steps: int = Field(5, ge=1)
    """Log the loss every this many steps (the loss curve's resolution)."""
    eval_steps: int | None = Field(None, ge=1)
    """Compute the eval loss every this many steps while training (logged with the train loss);
    unset: once, after training."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop when the eval loss has not improved for this many evaluations (needs eval_steps and
    keep: best)."""
    keep: Literal["last", "best"] = "last"
    """Which adapter the stage writes: the last step's, or the one with the lowest eval loss (needs
    eval_steps, and save_steps a multiple of it: the best is kept as a checkpoint)."""
    report_to: list[Literal["mlflow", "wandb", "tensorboard"]] = []
    """Trackers besides DVCLive (which logs whenever it is installed), through transformers' own
    integrations; each needs its package and its usual environment (MLFLOW_TRACKING_URI, WANDB_*)."""
    gradient_checkpointing: bool | int | Literal["auto"] = "auto"
    """Recompute activations in backward to save memory: true (every layer), false, a number of
    layers, or auto (the memory plan picks the fewest layers that fit; none on CPU)."""
    micro_batch: int | Literal["auto"] = "auto"
    """Rows per forward pass, derived by the memory plan (auto: the largest that fits); a number pins it.
    rows_per_step rows still make one optimizer step, so this changes memory and speed, not the math."""
    memory_budget_gib: float | None = None
    """GPU memory the plan may use; unset: the GPU's free memory when training starts."""
    embedding_on_cpu: bool | Literal["auto"] = "auto"
    """Keep the frozen input embedding in CPU memory: each micro-batch's rows are looked up there and
    copied to the GPU, which frees vocab x hidden weights of GPU memory (1 GiB at 8B) for a larger
    micro-batch. auto: the memory plan turns it on only when that lets a faster setting fit. Not with
    a tied output head, embed_tokens in modules_to_save or target_modules, or FSDP."""
    offload_checkpoints: bool | Literal["auto"] = "auto"
    """Keep the checkpointed layers' inputs in pinned CPU memory instead of GPU memory (copied out
    while the layer computes and back one layer ahead in backward), which frees tokens x hidden
    bytes per checkpointed layer for a larger micro-batch. auto: the memory plan turns it on only
    when that lets a faster setting fit. Single-GPU only (not with FSDP)."""
    packing: bool | Literal["auto"] = "auto"
    """Padding-free packing of each micro-batch's rows (attention stays within each row). auto: on a GPU."""
    fused_kernels: bool | Literal["auto"] = "auto"
    """Liger's fused linear cross-entropy, plus its fused RMSNorm/SwiGLU/RoPE when the plan's
    micro-batch has 4096 tokens or more (memplan.FUSED_LAYERS_MIN_TOKENS). auto: on a GPU when installed."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """AdamW with fp32 moments, or bitsandbytes' 8-bit AdamW (GPU)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype: auto is float32 on CPU and bfloat16 on a GPU."""
    num_gpus: int | Literal["auto"] = 1
    """GPUs of this machine to train on. Above 1 the stage relaunches itself through accelerate with
    FSDP, one process per GPU (loraflow/distributed.py); auto: every visible GPU. rows_per_step rows
    per optimizer step stay the same, split across the GPUs."""

    @model_validator(mode="before")
    @classmethod
    def _old_batch_keys(cls, data):
        old = [k for k in ("batch_size", "grad_accum") if isinstance(data, dict) and k in data]
        if old:
            raise ValueError(f"{' and '.join(old)} {'was' if len(old) == 1 else 'were'} replaced by rows_per_step "
                             "(rows per optimizer step across all GPUs, = batch_size x grad_accum); the memory plan "
                             "derives the micro-batch")
        return data

    @field_validator("target_modules")
    @classmethod
    def _some_module(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("name at least one module to adapt, or all-linear")
        return v

    @model_validator(mode="after")
    def _evaluation_during_training(self):
        if self.keep == "best" or self.early_stopping_patience:
            what = "train.keep: best" if self.keep == "best" else "train.early_stopping_patience"
            if not self.eval_steps:
                raise ValueError(f"{what} needs train.eval_steps (evaluations to choose from)")
            if self.keep != "best":
                raise ValueError("train.early_stopping_patience needs train.keep: best (stopping keeps the best adapter)")
            if self.save_steps % self.eval_steps:
                raise ValueError(f"train.keep: best needs train.save_steps ({self.save_steps}) to be a multiple of "
                                 f"train.eval_steps ({self.eval_steps}): the best step must have a checkpoint")
        return self

    _positive_micro_batch = at_least_one_or_auto("micro_batch")

    _at_least_one_gpu = at_least_one_or_auto("num_gpus")


class MergeParams(Section):
    """Merging the adapter into the base, and the check that it is exact."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the merged weights: auto keeps the base's own dtype."""
    probe_prompts: int = Field(8, ge=1)
    """How many eval prompts to compare merged vs base+adapter on."""
    atol: float = Field(1e-4, gt=0)
    """Allowed logit difference, absolute part (float32); bf16 merges need about 5e-2."""
    rtol: float = Field(1e-5, ge=0)
    """Allowed logit difference, relative part: the check allows atol + rtol x the largest |logit| of
    the trained model, because float32 rounding grows with the logits' scale (a longer or stronger
    fine-tune reaches 1e-4 by rounding alone); a wrong merge is off by orders of magnitude more."""
    min_greedy_agreement: float = Field(1.0, ge=0, le=1)
    """Share of probe prompts whose greedy continuation must be identical before and after merging."""
    qlora_base: Literal["dequantized", "original"] = "dequantized"
    """After QLoRA, merge into the dequantized 4-bit base (what the adapter was trained against, so
    the merged model computes what training computed) or into the original 16-bit weights. Both are
    checked against the trained 4-bit model and reported side by side in reports/merge_check.json."""


class EvaluateParams(Section):
    """Generation on the eval split and the metrics."""
    max_rows: int = Field(200, ge=1)
    """Evaluate at most this many eval rows (the first by id hash; deterministic)."""
    max_new_tokens: int = Field(48, ge=1)
    """Generation cap; hitting it without an EOS is flagged as never-ending."""
    batch_size: int | Literal["auto"] = "auto"
    """Rows generated together (each in its own KV cache slot). auto: on a GPU the largest power of two up to 256 whose
    KV cache fits the free memory (loraflow/memplan/generation.py); 32 on CPU."""
    strip_reasoning: bool = True
    """Score a generation's answer: `<think>...</think>` removed (an empty block a template inserts too),
    so a reasoning model's correct answer is not scored wrong for its reasoning."""
    exact_match_families: list[str] = ["capital", "language", "antonym", "next_day", "next_month",
                                       "addition", "category", "sentiment"]
    """Rows of these families score exact match; [] scores every row."""
    repetition_ngram: int = Field(3, ge=1)
    """n of the n-gram whose repeats flag a repetition loop."""
    repetition_min_repeats: int = Field(3, ge=2)
    """An n-gram seen this many times flags a repetition loop."""
    echo_min_chars: int = Field(20, ge=1)
    """An output repeating this many characters of the prompt verbatim flags prompt echo."""
    samples_in_report: int = Field(20, ge=0)
    """Rows shown side by side in reports/generation_audit.md."""

    _positive_batch = at_least_one_or_auto("batch_size")


class PromoteParams(Section):
    """The promotion gate after evaluation."""
    metrics: list[Literal["exact_match", "rouge1", "rouge2", "rougeL"]] = Field(["exact_match", "rougeL"], min_length=1)
    """Metrics on which the new adapter must win (all of them); at least one, or the gate passes anything."""
    min_gain_over_base: float = 0.05
    """The tuned model (the challenger) must beat the base model by at least this much on each metric."""
    min_gain_over_promoted: float = 0.0
    """...and the promoted adapter (the champion, scored on the same rows) by at least this much."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Each gain is the mean per-row difference on the same rows; it counts when the lower bound of
    this paired bootstrap confidence interval clears the margin (not the mean alone)."""
    bootstrap_resamples: int = Field(2000, ge=100)
    """Resamples of the paired bootstrap (seeded: the same scores give the same interval)."""
    scope: str = Field("default", min_length=1)
    """The registry's scope: the promoted adapter is a rival only to runs of the same scope (and the
    same base model). Name a new scope when the workspace starts on other data or another task: the
    first run then compares with the base only, says so, and its promotion replaces the old scope's
    adapter in models/promoted (DVC and git keep that one's history)."""


class ScheduleParams(Section):
    """Retraining schedule of the served deployment (`loraflow serve`); not read by any stage."""
    cron: str | None = None
    """Cron expression, e.g. "0 3 * * *" (UTC); None: runs only when triggered. --cron overrides it."""
    stage_timeout_s: float = Field(12 * 3600, gt=0)
    """A stage running longer than this is stopped and the run fails."""


class LineageParams(Section):
    """reports/lineage.json: no settings yet; the section exists so the stage follows the contract."""


SECTIONS: dict[str, type[Section]] = {
    "base": BaseParams, "ingest": IngestParams, "validate": ValidateParams,
    "template": TemplateParams, "tokenize": TokenizeParams, "train": TrainParams,
    "merge": MergeParams, "evaluate": EvaluateParams, "promote": PromoteParams, "lineage": LineageParams,
    "schedule": ScheduleParams,
}


class ParamsError(LoraflowError):
    """params.yaml is malformed: every problem, each with its key."""


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found. Run from the project root, or pass --params.") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    return data


def _problems(section: str, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        key = ".".join([section, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        elif e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # our own check's words, without pydantic's "Value error, " prefix
        else:
            msg = e["msg"]
        out.append(f"{key}: {msg}")
    return out


def load_section(name: str, path: Path | str = PARAMS_FILE) -> Section:
    """Load and check one section of params.yaml."""
    path = Path(path)
    model = SECTIONS[name]
    data = _read(path)
    missing = _missing_section(name, data)
    if missing:
        raise ParamsError(f"{path}: invalid parameters:\n  {missing}")
    secrets = secret_values({name: data.get(name)})
    if secrets:
        raise ParamsError(f"{path}: invalid parameters:\n  " + "\n  ".join(f"{k}: {SECRET_IN_PARAMS}" for k in secrets))
    try:
        return model.model_validate(data.get(name) or {})
    except ValidationError as e:
        raise ParamsError(f"{path}: invalid parameters:\n  " + "\n  ".join(_problems(name, e))) from None


def _missing_section(name: str, data: dict) -> str | None:
    """A section with settings must be in the file: an absent or empty one would silently run on the
    code's defaults, which are not the values params.yaml documents."""
    if SECTIONS[name].model_fields and not data.get(name):
        return (f"{name}: section missing or empty; list its keys (see loraflow/params.py, or a fresh "
                f"clone's params.yaml)")
    return None


def load_all(path: Path | str = PARAMS_FILE) -> dict[str, Section]:
    """Load every section, reporting every problem in the file at once."""
    path = Path(path)
    return validate_all(_read(path), str(path))


def secret_values(data: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose value holds a token-shaped secret."""
    found = []
    for key, value in data.items() if isinstance(data, dict) else []:
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            found += secret_values(value, dotted + ".")
        elif isinstance(value, list):
            found += secret_values({str(i): v for i, v in enumerate(value)}, dotted + ".")
        elif isinstance(value, str) and TOKEN_SHAPES.search(value):
            found.append(dotted)
    return found


SECRET_IN_PARAMS = ("holds a token-shaped secret; secrets never go in params.yaml (it is committed, and its values "
                    "reach dvc.lock and Prefect's database): read it from an environment variable instead")


def validate_all(data: dict, origin: str) -> dict[str, Section]:
    """Check a whole params mapping; `origin` names where it came from in the error."""
    problems = [f"{k}: unknown section (known: {', '.join(SECTIONS)})" for k in data if k not in SECTIONS]
    problems += [f"{key}: {SECRET_IN_PARAMS}" for key in secret_values(data)]
    loaded = {}
    for name, model in SECTIONS.items():
        missing = _missing_section(name, data)
        if missing:
            problems.append(missing)
            continue
        try:
            loaded[name] = model.model_validate(data.get(name) or {})
        except ValidationError as e:
            problems += _problems(name, e)
    if problems:
        raise ParamsError(f"{origin}: invalid parameters:\n  " + "\n  ".join(problems))
    return loaded
