"""Merging a LoRA adapter into its base one tensor at a time: each base shard is read through a
memory map and its merged copy written tensor by tensor, so an 8B merge holds a few tensors in CPU
memory, never a shard, let alone the model.

W' = W + scale * B @ A for every adapted weight, computed in float32 and stored in the output dtype;
modules trained in full beside the adapter (modules_to_save) replace their base weights, and token
rows trained beside it (PEFT's trainable tokens) replace their rows. When the template added tokens,
the embedding and head grow first, the new rows set as training grew them (modeling.grown_rows).

After QLoRA, the base the adapter was trained on is the 4-bit nf4 copy of W, not W: `nf4_base`
merges into dequantize(quantize(W)) instead, exactly what the 4-bit layers computed with in
training (bitsandbytes' own quantize_4bit/dequantize_4bit: blocks of 64, double quant).
"""
from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loraflow.errors import LoraflowError
from loraflow.modeling import grown_rows

ADAPTER_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
NOT_QUANTIZED = ("embed_tokens", "lm_head")  # bitsandbytes keeps these in 16-bit
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"  # PEFT's key of trained token rows
TIED_HEAD = "lm_head.token_adapter."  # PEFT's copy of the embedding's rows, for a tied head
TOKEN_BASE = ".token_adapter.base_layer"  # and of the whole matrix under them, saved when the vocabulary grew
VOCAB_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")  # the Llama, Qwen, Gemma, Mistral and Phi-3 names


def read_adapter(adapter_dir: Path, tied_head: bool = False) -> tuple[dict, dict, dict]:
    """From a saved PEFT LoRA adapter: {base weight name: (A, B, scale)}, {base weight name:
    replacement}, and {base weight name: (row indices, rows)} for trained token rows. tied_head: the
    base ties its head to the embedding, so what PEFT saved for the head is the embedding's, again."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise LoraflowError(f"{adapter_dir}: streaming merge does not handle {unsupported or ['bias']}")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora, replaced, rows = {}, {}, {}
    token_indices = config.get("trainable_token_indices") or {}
    for key, value in tensors.items():
        name = key.removeprefix(ADAPTER_PREFIX)
        if tied_head and name.startswith(TIED_HEAD):
            continue
        if TOKEN_ROWS in name:
            module = name.split(TOKEN_ROWS)[0]
            # a list of indices names the input embedding's rows; a dict names them per module
            indices = token_indices.get(module.rsplit(".", 1)[-1]) if isinstance(token_indices, dict) else token_indices
            if indices is None or len(indices) != value.shape[0]:
                raise LoraflowError(f"{adapter_dir}: trained rows of {module} do not match trainable_token_indices")
            rows[module + ".weight"] = (torch.tensor(indices), value)
        elif ".lora_A." in name:
            base_key = name.replace(".lora_A.weight", ".weight")
            lora[base_key] = (value, tensors[key.replace(".lora_A.", ".lora_B.")], scale)
        elif ".lora_B." not in name:
            # PEFT saves a grown embedding or head whole (its base_layer), as training had it
            replaced[name.replace(TOKEN_BASE, "")] = value
    return lora, replaced, rows


def base_shards(base_dir: Path) -> list[Path]:
    index = base_dir / INDEX
    if index.exists():
        return [base_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = base_dir / "model.safetensors"
    if not single.exists():
        raise LoraflowError(f"{base_dir}: no model.safetensors or {INDEX}: the base must be safetensors")
    return [single]


def nf4_roundtrip(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    packed, state = bnbf.quantize_4bit(weight.to(compute_dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)


def is_quantized_linear(key: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and key.endswith(".weight") and not any(n in key for n in NOT_QUANTIZED)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, list[int]]], produce) -> None:
    """A safetensors file written one tensor at a time: the header (names, dtypes, shapes, offsets) is
    known up front, so each tensor can be produced, written and dropped in turn."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (dtype, shape) in specs.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, (dtype, shape) in specs.items():
            tensor = produce(key)
            assert tensor.dtype == dtype and list(tensor.shape) == list(shape), key
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def merge_tensor(key: str, weight: torch.Tensor, lora: dict, out_dtype: torch.dtype, nf4_base: bool,
                 compute_dtype: torch.dtype, work: torch.device, rows: dict | None = None,
                 grow_to: int = 0) -> torch.Tensor:
    w = weight.to(work)
    if grow_to > w.shape[0]:
        # grown in the dtype training loaded the base in (compute_dtype), as modeling.fit_vocab did
        w = grown_rows(w.to(compute_dtype), grow_to)
    if nf4_base and is_quantized_linear(key, w):
        w = nf4_roundtrip(w, compute_dtype)
    if key in lora:
        a, b, scale = lora[key]
        w = w.float() + scale * (b.to(work, torch.float32) @ a.to(work, torch.float32))
    if rows and key in rows:
        indices, values = rows[key]
        w = w.index_copy(0, indices.to(work), values.to(work, w.dtype))
    return w.to(out_dtype).cpu()


def grows_with_vocab(key: str) -> bool:
    """The input embedding and the output head: the weights with a row per token."""
    return key.endswith(VOCAB_WEIGHTS)


def memory_status(field: str) -> float:
    """VmRSS or VmHWM (this process's peak resident memory) in GiB. Not getrusage's ru_maxrss: a child
    inherits its parent's peak there, across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Start VmHWM afresh from the current RSS (Linux: write 5 to clear_refs); returns that RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then includes what came before; an over-estimate, never an under-estimate
    return memory_status("VmRSS")


def merge_shards(base_dir: Path, adapter_dir: Path, out_dir: Path, *, out_dtype: torch.dtype | None = None,
                 nf4_base: bool = False, compute_dtype: torch.dtype = torch.bfloat16,
                 work: torch.device | str = "cpu", vocab_size: int = 0) -> dict:
    """Write base + adapter, merged, to out_dir with the base's own sharding. Returns what it did.
    vocab_size: the vocabulary grown for tokens the template added (the embedding and head get rows)."""
    t0, rss0 = time.perf_counter(), reset_peak_rss()
    config = json.loads((base_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))
    lora, replaced, rows = read_adapter(adapter_dir, tied_head=tied)
    pending = set(lora) | set(replaced) | set(rows)
    grown = 0
    shards = base_shards(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            specs = {}
            for key in f.keys():
                view = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES[view.get_dtype()]
                shape = view.get_shape()
                if grows_with_vocab(key) and vocab_size > shape[0]:
                    shape, grown = [vocab_size, *shape[1:]], vocab_size - shape[0]
                specs[key] = (out_dtype if out_dtype is not None and dtype.is_floating_point else dtype, shape)

            def produce(key):
                weight = replaced[key] if key in replaced else f.get_tensor(key)
                pending.discard(key)
                return merge_tensor(key, weight, lora, specs[key][0], nf4_base, compute_dtype, torch.device(work),
                                    rows, grow_to=specs[key][1][0] if grows_with_vocab(key) else 0)
            write_safetensors(out_dir / shard.name, specs, produce)
    if pending:
        raise LoraflowError(f"{adapter_dir}: {len(pending)} adapter weights have no base weight in {base_dir}, "
                            f"e.g. {sorted(pending)[:3]}: this adapter was not trained on this base")
    for name in (INDEX, "config.json", "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out_dir / name)
    config = json.loads((out_dir / "config.json").read_text())
    if out_dtype is not None:
        config["dtype"] = str(out_dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    if grown:
        config["vocab_size"] = vocab_size
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return {"shards": len(shards), "merged_weights": len(lora), "replaced_weights": len(replaced),
            "token_rows_replaced": sum(len(i) for i, _ in rows.values()), "rows_added": grown,
            "nf4_base": nf4_base, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_gib": round(memory_status("VmHWM"), 3), "rss_before_gib": round(rss0, 3)}
