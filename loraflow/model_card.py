"""The model card a merged or promoted model carries (its README.md): what a serving team needs to
take it over without asking: the base and its revision, the chat template and where generation
stops, the data and params that trained it, how it scored (with intervals, once the gate has run)
and where to find its lineage.
"""
from __future__ import annotations

import json

from loraflow.chat_format import ChatFormat


def _table(rows: list[tuple[str, object]]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    return ["| | |", "|---|---|", *[f"| {k} | {cell(v)} |" for k, v in rows]]


def model_card(title: str, train_info: dict, chat: ChatFormat, data: dict, merge_check: dict | None = None,
               decision: dict | None = None) -> str:
    """Markdown for models/merged/README.md (merge_check) or models/promoted/README.md (decision)."""
    params = train_info.get("params", {})
    parent = train_info.get("init_from")
    lines = [f"# {title}", "", "Fine-tuned with loraflow: a LoRA adapter trained on the base below"
             + (", then merged into it." if merge_check else "."), "", "## Base and training", ""]
    lines += _table([("base", train_info.get("base")), ("base revision", train_info.get("base_revision") or "-"),
                     ("method", train_info.get("method")), ("LoRA rank / alpha", f"{params.get('rank')} / {params.get('alpha')}"),
                     ("target modules", params.get("target_modules")), ("trainable token rows", params.get("trainable_tokens")),
                     ("started from", f"the adapter {parent['sha256'][:12]} ({parent['path']})" if parent else "a fresh adapter"),
                     ("epochs / lr / rows per step", f"{params.get('epochs')} / {params.get('lr')} / {params.get('rows_per_step')}"),
                     ("train fingerprint", str(train_info.get("fingerprint", ""))[:16])])
    lines += ["", "## Chat format", "", "Render prompts with the chat template saved beside the weights "
              "(tokenizer_config.json or chat_template.jinja); `generation_config.json` stops on every id below.", ""]
    lines += _table([("template", chat.template_source), ("end of turn", f"`{chat.end_of_turn}` (ids {chat.end_of_turn_ids})"),
                     ("stop ids", chat.stop_ids), ("tokens added to the base", " ".join(chat.added_tokens) or "none"),
                     ("fixed date in the template", chat.date)])
    lines += ["", "## Data", ""] + _table(list(data.items()))
    if merge_check:
        lines += ["", "## Merge check", "", f"The merged weights were compared with base + adapter on "
                  f"{merge_check['probe_prompts']} prompts in {merge_check['dtype']}: largest logit difference "
                  f"{merge_check['max_abs_logit_diff']:.3g}, greedy agreement {merge_check['greedy_agreement']:.0%}. "
                  "Scores: reports/metrics.json of the run that produced it."]
    if decision:
        lines += ["", "## Scores (why it was promoted)", "",
                  f"On {decision['eval_rows']} held-out rows (content sha256 {decision['eval_rows_sha256'][:12]}); "
                  "each difference is a mean per-row difference with its paired bootstrap interval.", "",
                  "| metric | this model | compared with | difference | interval | verdict |", "|---|---|---|---|---|---|"]
        for key, rivals in decision["comparisons"].items():
            for rival, d in rivals.items():
                lines.append(f"| {key} | {d['a']:.4f} | {rival} {d['b']:.4f} | {d['difference']:+.4f} | "
                             f"{d['low']:+.4f} to {d['high']:+.4f} | {d['verdict']} |")
    lines += ["", "## Lineage", "", "reports/lineage.json of the producing run links the raw data, the validated "
              "rows, the tokens, this adapter and the metrics by content hash; `dvc pull` at its git commit restores them.", "",
              "<!-- train_info: " + json.dumps({k: train_info.get(k) for k in ("base", "base_revision", "fingerprint")}) + " -->"]
    return "\n".join(lines) + "\n"


def card_data(train_info: dict, **more) -> dict:
    """The card's data rows: what trained the adapter, by content hash."""
    return {"train rows": train_info.get("train_rows"),
            "train tokens sha256": train_info.get("train_tokens_sha256"), **more}
