"""Loading the base model and tokenizer: one code path for the bundled default, a local directory
and a hub id.

models/base is either a full model directory (the bundled default) or holds only reference.json,
written by the base stage, naming a local path or hub id and its revision. Weights load only from
safetensors, and remote code runs only when params.base.trust_remote_code is on.
"""
from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraflow.errors import LoraflowError

REFERENCE_FILE = "reference.json"


@dataclass(frozen=True)
class BaseRef:
    """Where the base weights and tokenizer come from."""
    location: str
    revision: str | None = None
    trust_remote_code: bool = False


def resolve_base(base_dir: Path | str) -> BaseRef:
    base_dir = Path(base_dir)
    ref = base_dir / REFERENCE_FILE
    if ref.exists():
        data = json.loads(ref.read_text())
        return BaseRef(data["source"], data.get("revision"), bool(data.get("trust_remote_code", False)))
    if not (base_dir / "config.json").exists():
        raise LoraflowError(f"{base_dir}: no base model here (no config.json and no {REFERENCE_FILE}). "
                            "Run the base stage first: dvc repro base")
    return BaseRef(str(base_dir))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_map() -> dict | None:
    """Load weights straight onto this process's GPU when there is one (quantized weights must be);
    None: the CPU, or FSDP, which loads on CPU and moves each shard to its GPU itself."""
    from loraflow import distributed
    if not torch.cuda.is_available() or distributed.fsdp_enabled():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def release_memory() -> None:
    """Give freed model memory back; call it after the last reference to a model is dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compute_dtype(name: str) -> torch.dtype:
    """'auto' is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on a GPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(ref: BaseRef):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(ref.location, revision=ref.revision,
                                            trust_remote_code=ref.trust_remote_code)
    except (OSError, ValueError) as e:  # a missing repo or file, a malformed id (HFValidationError)
        raise LoraflowError(f"{ref.location}: could not load a tokenizer ({str(e).splitlines()[0]}). For a hub id, "
                            "check the name, revision and network/HF_HUB_OFFLINE; for a path, that it holds one") from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and labels, so any id serves.
        tok.pad_token = tok.eos_token
    return tok


def load_config(ref: BaseRef):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(ref.location, revision=ref.revision, trust_remote_code=ref.trust_remote_code)


def load_model(ref: BaseRef, dtype: torch.dtype, quantization_config=None, device_map=None, attn_implementation=None):
    from transformers import AutoModelForCausalLM
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            ref.location, revision=ref.revision, dtype=dtype, use_safetensors=True,
            trust_remote_code=ref.trust_remote_code, quantization_config=quantization_config,
            device_map=device_map, **extra)
    except OSError as e:
        raise LoraflowError(f"{ref.location}: could not load the base model ({e}). Weights must be "
                            "safetensors; for a hub id, check the name, revision and network/HF_HUB_OFFLINE.") from None


def grown_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with rows appended up to `rows`, each the mean of the old rows (in float32): a token
    the base never had starts as the average token, not as noise that a softmax would pick up. Every
    stage and the streaming merge grow a vocabulary with this one function, so they agree bit for bit."""
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def fit_vocab(model, size: int) -> int:
    """The model's input embedding (and untied output head) grown to `size` rows for tokens the
    template stage added (ChatFormat.added_tokens); returns the rows added. A model that already has
    the rows (Qwen pads its vocabulary) is left as it is."""
    old = model.get_input_embeddings().weight.shape[0]
    if size <= old:
        return 0
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            module.weight.copy_(grown_rows(module.weight[:old], size))
    return size - old


LORA8_UNSHARDABLE = ("train.method=lora8 cannot be sharded across GPUs (FSDP shards no int8 weights); "
                     "use lora or qlora with train.num_gpus above 1")


def quantization_config(method: str, dtype: torch.dtype, sharded: bool = False):
    """bitsandbytes settings for the method. sharded (FSDP): the 4-bit weights are stored in the
    compute dtype, since FSDP shards only floating-point tensors."""
    if method not in ("lora8", "qlora"):
        return None
    if not torch.cuda.is_available():
        raise LoraflowError(f"train.method={method} needs a CUDA GPU (bitsandbytes kernels). "
                            "On CPU use train.method: lora.")
    if sharded and method == "lora8":
        raise LoraflowError(LORA8_UNSHARDABLE)
    from transformers import BitsAndBytesConfig
    if method == "lora8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if sharded else torch.uint8)


def local_model_dir(ref: BaseRef) -> Path:
    """The directory holding the base's safetensors: the path itself, or the hub snapshot in the local cache
    (fetched when HF_HUB_OFFLINE allows)."""
    if Path(ref.location).is_dir():
        return Path(ref.location)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(ref.location, revision=ref.revision, allow_patterns=["*.safetensors", "*.json"]))
