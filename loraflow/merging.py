"""Merging a LoRA adapter into its base one tensor at a time: each base shard is read through a
memory map and its merged copy written tensor by tensor, so an 8B merge holds a few tensors in CPU
memory, never a shard, let alone the model.

W' = W + scale * B @ A for every adapted weight, computed in float32 and stored in the output dtype;
modules trained in full beside the adapter (modules_to_save) replace their base weights.

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

ADAPTER_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
NOT_QUANTIZED = ("embed_tokens", "lm_head")  # bitsandbytes keeps these in 16-bit


def read_adapter(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
    """{base weight name: (A, B, scale)} and {base weight name: replacement} from a saved PEFT LoRA adapter."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise LoraflowError(f"{adapter_dir}: streaming merge does not handle {unsupported or ['bias']}")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora, replaced = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix(ADAPTER_PREFIX)
        if ".lora_A." in name:
            base_key = name.replace(".lora_A.weight", ".weight")
            lora[base_key] = (value, tensors[key.replace(".lora_A.", ".lora_B.")], scale)
        elif ".lora_B." not in name:
            replaced[name] = value
    return lora, replaced


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
                 compute_dtype: torch.dtype, work: torch.device) -> torch.Tensor:
    w = weight.to(work)
    if nf4_base and is_quantized_linear(key, w):
        w = nf4_roundtrip(w, compute_dtype)
    if key in lora:
        a, b, scale = lora[key]
        w = w.float() + scale * (b.to(work, torch.float32) @ a.to(work, torch.float32))
    return w.to(out_dtype).cpu()


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
                 work: torch.device | str = "cpu") -> dict:
    """Write base + adapter, merged, to out_dir with the base's own sharding. Returns what it did."""
    t0, rss0 = time.perf_counter(), reset_peak_rss()
    lora, replaced = read_adapter(adapter_dir)
    pending = set(lora) | set(replaced)
    shards = base_shards(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            specs = {}
            for key in f.keys():
                view = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES[view.get_dtype()]
                specs[key] = (out_dtype if out_dtype is not None and dtype.is_floating_point else dtype, view.get_shape())

            def produce(key):
                weight = replaced[key] if key in replaced else f.get_tensor(key)
                pending.discard(key)
                return merge_tensor(key, weight, lora, specs[key][0], nf4_base, compute_dtype, torch.device(work))
            write_safetensors(out_dir / shard.name, specs, produce)
    if pending:
        raise LoraflowError(f"{adapter_dir}: {len(pending)} adapter weights have no base weight in {base_dir}, "
                            f"e.g. {sorted(pending)[:3]}: this adapter was not trained on this base")
    for name in (INDEX, "config.json", "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out_dir / name)
    if out_dtype is not None:
        config = json.loads((out_dir / "config.json").read_text())
        config["dtype"] = str(out_dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return {"shards": len(shards), "merged_weights": len(lora), "replaced_weights": len(replaced),
            "nf4_base": nf4_base, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_gib": round(memory_status("VmHWM"), 3), "rss_before_gib": round(rss0, 3)}
