"""merge stage: fold the adapter into the base and check that nothing changed on the way.

    python -m tasks.merge       (or: dvc repro merge)

The merge streams: one safetensors shard of the base at a time is read, merged and written
(loraflow/merging.py), so the CPU never holds more than a shard of the model. The merged model is
then checked against the model that was trained, base + adapter (after QLoRA: the 4-bit base +
adapter), on probe prompts from the eval split: the largest absolute and relative logit
differences, and agreement of greedy continuations. The merge fails, publishing nothing, when the
logits differ by more than merge.atol + merge.rtol x the largest |logit|, or fewer than
merge.min_greedy_agreement of the greedy continuations agree.

After QLoRA both merge bases are checked (the dequantized 4-bit weights and the original 16-bit
ones) and reported side by side; merge.qlora_base chooses which one is published.

Imports neither prefect, dvc nor pandera: this stage also runs on minimal GPU machines.
"""
from __future__ import annotations

import json
import logging
import shutil

import pandas as pd
import torch

from loraflow import layout
from loraflow.artifacts import atomic_path, sha256_tree, write_json, write_text
from loraflow.chat_format import ChatFormat, run_tokenizer, save_chat_format
from loraflow.errors import LoraflowError
from loraflow.generation import generate_texts
from loraflow.merging import merge_shards
from loraflow.model_card import card_data, model_card
from loraflow.modeling import (BaseRef, compute_dtype, device, device_map, fit_vocab, load_model,
                               local_model_dir, quantization_config, release_memory, resolve_base)
from loraflow.params import MergeParams
from loraflow.stage import main

log = logging.getLogger("loraflow.merge")
PROBE_NEW_TOKENS = 16


@torch.no_grad()
def probe(model, tokenizer, prompts: list[str], chat: ChatFormat) -> tuple[torch.Tensor, list[str]]:
    """Logits of the prompts (left-padded batch, pad positions zeroed) and greedy continuations."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    logits = model(**batch).logits.float()
    logits = logits * batch["attention_mask"][..., None]
    texts = generate_texts(model, tokenizer, prompts, stop_ids=chat.stop_ids, end_of_turn=chat.end_of_turn,
                           max_new_tokens=PROBE_NEW_TOKENS, batch_size=len(prompts))
    return logits.cpu(), [t["text"] for t in texts]


def compare(before: torch.Tensor, after: torch.Tensor, greedy_before: list[str], greedy_after: list[str]) -> dict:
    diff = (before - after).abs()
    return {"max_abs_logit_diff": float(diff.max()), "max_abs_logit": float(before.abs().max()),
            "max_rel_logit_diff": float((diff / before.abs().clamp_min(1e-6)).max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "greedy_agreement": sum(a == b for a, b in zip(greedy_before, greedy_after)) / max(len(greedy_before), 1)}


def verdict(check: dict, params: MergeParams) -> tuple[float, bool]:
    """The logit difference the check allows (atol + rtol x the trained model's largest |logit|) and
    whether the merge passes: within it, and greedy continuations agreeing often enough."""
    allowed = params.atol + params.rtol * check["max_abs_logit"]
    return allowed, check["max_abs_logit_diff"] <= allowed and check["greedy_agreement"] >= params.min_greedy_agreement


def trained_model_probe(ref, method: str, dtype: torch.dtype, tokenizer, prompts, chat: ChatFormat):
    """The model as training saw it: the base (4-bit after QLoRA) with the adapter, unmerged."""
    from peft import PeftModel
    base = load_model(ref, dtype, quantization_config=quantization_config(method, dtype) if method == "qlora" else None,
                      device_map=device_map())
    fit_vocab(base, len(tokenizer))  # the rows of the tokens the template added, as training grew them
    model = PeftModel.from_pretrained(base, layout.ADAPTER_DIR).eval()
    result = probe(model, tokenizer, prompts, chat)
    del model, base
    release_memory()
    return result


def merged_probe(path, dtype: torch.dtype, tokenizer, prompts, chat: ChatFormat):
    model = load_model(BaseRef(str(path)), dtype, device_map=device_map())
    result = probe(model.eval(), tokenizer, prompts, chat)
    del model
    release_memory()
    return result


def run(params: MergeParams) -> dict:
    ref = resolve_base(layout.BASE_DIR)
    chat = ChatFormat.read(layout.CHAT_FORMAT)
    tokenizer = run_tokenizer(ref, chat)
    train_info = json.loads((layout.ADAPTER_DIR / "train_info.json").read_text())
    method = train_info["method"]
    dtype = torch.float32 if params.dtype == "auto" and device().type == "cpu" else compute_dtype(params.dtype)
    prompts = list(pd.read_parquet(layout.EVAL_TOKENS).sort_values("id")["prompt"].head(params.probe_prompts))
    logits_trained, greedy_trained = trained_model_probe(ref, method, dtype, tokenizer, prompts, chat)
    base_dir = local_model_dir(ref)

    def merge_and_check(out_dir, nf4_base: bool) -> dict:
        info = merge_shards(base_dir, layout.ADAPTER_DIR, out_dir, out_dtype=dtype, nf4_base=nf4_base,
                            compute_dtype=dtype, work=device(), vocab_size=len(tokenizer))
        logits, greedy = merged_probe(out_dir, dtype, tokenizer, prompts, chat)
        return {**compare(logits_trained, logits, greedy_trained, greedy), "merge": info}

    bases = {"dequantized": True, "original": False} if method == "qlora" else {"original": False}
    chosen = params.qlora_base if method == "qlora" else "original"
    with atomic_path(layout.MERGED_DIR, is_dir=True) as tmp:
        results = {chosen: merge_and_check(tmp, bases[chosen])}
        for other in set(bases) - {chosen}:  # reported beside the chosen one, not published
            scratch = layout.MERGED_DIR.with_name(f".{layout.MERGED_DIR.name}.{other}")
            try:
                results[other] = merge_and_check(scratch, bases[other])
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        check = {**{k: v for k, v in results[chosen].items() if k != "merge"}, "merge": results[chosen]["merge"],
                 "atol": params.atol, "rtol": params.rtol, "min_greedy_agreement": params.min_greedy_agreement,
                 "probe_prompts": len(prompts), "dtype": str(dtype).replace("torch.", ""), "adapter_method": method,
                 "merged_into": {"original": "the unquantized base",
                                 "dequantized": "the dequantized 4-bit nf4 base the adapter was trained on"}[chosen],
                 "base": ref.location, "base_revision": ref.revision, "adapter_sha256": sha256_tree(layout.ADAPTER_DIR)}
        if method == "qlora":
            check["qlora_bases"] = {k: {m: v[m] for m in ("max_abs_logit_diff", "max_rel_logit_diff", "greedy_agreement")}
                                    for k, v in results.items()}
            check["qlora_base_closest_to_trained"] = min(results, key=lambda k: results[k]["max_abs_logit_diff"])
        check["allowed_logit_diff"], check["passed"] = verdict(check, params)
        write_json(layout.MERGE_CHECK, check)
        if not check["passed"]:
            raise LoraflowError(
                f"merged model differs from the trained one (base+adapter): max |logit diff| "
                f"{check['max_abs_logit_diff']:.3g}, allowed {check['allowed_logit_diff']:.3g} (merge.atol {params.atol} "
                f"+ merge.rtol {params.rtol} x largest |logit| {check['max_abs_logit']:.3g}), greedy agreement "
                f"{check['greedy_agreement']:.0%} (merge.min_greedy_agreement {params.min_greedy_agreement:.0%}). "
                f"See {layout.MERGE_CHECK}. In a 16-bit dtype, rounding alone can reach about 5e-2: merge in "
                "float32 (merge.dtype) or raise merge.atol.")
        save_chat_format(tmp, tokenizer, chat)
        write_text(tmp / "README.md", model_card(f"{ref.location}, fine-tuned and merged", train_info, chat,
                                                 card_data(train_info), merge_check=check))
        write_json(tmp / "merge_info.json", {k: check[k] for k in ("base", "base_revision", "merged_into",
                                                                     "adapter_sha256", "dtype")})
    log.info("merge check passed: max |logit diff| %.2e, greedy agreement %.0f%%; %d shards in %.1fs, peak RSS %.2f GiB",
             check["max_abs_logit_diff"], 100 * check["greedy_agreement"], check["merge"]["shards"],
             check["merge"]["seconds"], check["merge"]["peak_rss_gib"])
    return {k: check[k] for k in ("max_abs_logit_diff", "max_rel_logit_diff", "greedy_agreement", "probe_prompts",
                                  "dtype", "merged_into")} | {"merge_seconds": check["merge"]["seconds"]}


if __name__ == "__main__":
    main("merge", run)
