"""merge stage: fold the adapter into the base and check that nothing changed on the way.

    python -m tasks.merge       (or: dvc repro merge)

The base is always loaded unquantized (after QLoRA too: the adapter is merged into the 16-bit
weights, never into 4-bit ones) and the choice is recorded. Before and after merging, the model
runs on probe prompts from the eval split; the merge fails when the logits differ by more than
merge.atol or the greedy continuations disagree more than merge.min_greedy_agreement allows.

Imports neither prefect, dvc nor pandera: this stage also runs on minimal GPU machines.
"""
from __future__ import annotations

import json
import logging

import pandas as pd
import torch

from loraflow import layout
from loraflow.artifacts import atomic_path, sha256_tree, write_json
from loraflow.errors import LoraflowError
from loraflow.generation import greedy_generate
from loraflow.modeling import compute_dtype, device, load_model, load_tokenizer, resolve_base
from loraflow.params import MergeParams
from loraflow.stage import main

log = logging.getLogger("loraflow.merge")
PROBE_NEW_TOKENS = 16


@torch.no_grad()
def probe(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Logits of the prompts (left-padded batch, pad positions zeroed) and greedy continuations."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    logits = model(**batch).logits.float()
    logits = logits * batch["attention_mask"][..., None]
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=PROBE_NEW_TOKENS, batch_size=len(prompts))
    return logits.cpu(), [t["text"] for t in texts]


def compare(before: torch.Tensor, after: torch.Tensor, greedy_before: list[str], greedy_after: list[str]) -> dict:
    diff = (before - after).abs()
    return {"max_abs_logit_diff": float(diff.max()),
            "max_rel_logit_diff": float((diff / before.abs().clamp_min(1e-6)).max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "greedy_agreement": sum(a == b for a, b in zip(greedy_before, greedy_after)) / max(len(greedy_before), 1)}


def run(params: MergeParams) -> dict:
    from peft import PeftModel

    ref = resolve_base(layout.BASE_DIR)
    tokenizer = load_tokenizer(ref)
    train_info = json.loads((layout.ADAPTER_DIR / "train_info.json").read_text())
    dtype = torch.float32 if params.dtype == "auto" and device().type == "cpu" else compute_dtype(params.dtype)
    base = load_model(ref, dtype).to(device())
    model = PeftModel.from_pretrained(base, layout.ADAPTER_DIR).eval()
    prompts = list(pd.read_parquet(layout.EVAL_TOKENS).sort_values("id")["prompt"].head(params.probe_prompts))

    logits_adapter, greedy_adapter = probe(model, tokenizer, prompts)
    merged = model.merge_and_unload().eval()
    logits_merged, greedy_merged = probe(merged, tokenizer, prompts)
    check = {**compare(logits_adapter, logits_merged, greedy_adapter, greedy_merged),
             "atol": params.atol, "min_greedy_agreement": params.min_greedy_agreement,
             "probe_prompts": len(prompts), "dtype": str(dtype).replace("torch.", ""),
             "adapter_method": train_info["method"],
             "merged_into": "unquantized base" + (" (adapter trained on its 4-bit nf4 copy)" if train_info["method"] == "qlora" else ""),
             "base": ref.location, "base_revision": ref.revision, "adapter_sha256": sha256_tree(layout.ADAPTER_DIR)}
    check["passed"] = check["max_abs_logit_diff"] <= params.atol and check["greedy_agreement"] >= params.min_greedy_agreement
    write_json(layout.MERGE_CHECK, check)
    if not check["passed"]:
        raise LoraflowError(
            f"merged model differs from base+adapter: max |logit diff| {check['max_abs_logit_diff']:.3g} "
            f"(merge.atol {params.atol}), greedy agreement {check['greedy_agreement']:.0%} "
            f"(merge.min_greedy_agreement {params.min_greedy_agreement:.0%}). See {layout.MERGE_CHECK}. In a 16-bit "
            "dtype, rounding alone can reach about 5e-2: merge in float32 (merge.dtype) or raise merge.atol.")
    with atomic_path(layout.MERGED_DIR, is_dir=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "merge_info.json", {k: check[k] for k in ("base", "base_revision", "merged_into",
                                                                     "adapter_sha256", "dtype")})
    log.info("merge check passed: max |logit diff| %.2e, greedy agreement %.0f%%",
             check["max_abs_logit_diff"], 100 * check["greedy_agreement"])
    return {k: check[k] for k in ("max_abs_logit_diff", "greedy_agreement", "probe_prompts", "dtype", "merged_into")}


if __name__ == "__main__":
    main("merge", run)
