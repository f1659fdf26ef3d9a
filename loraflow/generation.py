"""Batched greedy generation, shared by the merge check, the evaluate stage and the benchmarks.

Prompts are sorted by length so each batch pads little, left-padded so every row's next token
sits in the last column, and returned in the caller's order.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate_ids(model, prompts: list[list[int]], *, pad_id: int, eos_id: int | None, max_new_tokens: int,
                        batch_size: int, static_cache: bool = False, pad_to_multiple: int = 1) -> list[dict]:
    """For each prompt (token ids): the new ids up to the first eos_id, and whether one came before the cap.

    static_cache: a preallocated KV cache, which lets transformers compile the decode step into a CUDA
    graph (GPU); pad_to_multiple rounds each batch's width up so few distinct shapes are compiled.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = -(-max(len(prompts[i]) for i in idx) // pad_to_multiple) * pad_to_multiple
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n:] = torch.as_tensor(prompts[i])
            mask[row, width - n:] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=eos_id, pad_token_id=pad_id,
                             **({"cache_implementation": "static"} if static_cache else {}))
        for i, new in zip(idx, out[:, width:].tolist()):
            ended = eos_id is not None and eos_id in new
            results[i] = {"ids": new[:new.index(eos_id)] if ended else new, "ended": ended}
    return results


def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[dict]:
    """For each prompt: the decoded text up to the first end-of-turn, whether one came before the
    cap, and the number of new tokens."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = greedy_generate_ids(model, encoded, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"text": tokenizer.decode(o["ids"], skip_special_tokens=True).strip(), "ended": o["ended"],
             "new_tokens": len(o["ids"]) + int(o["ended"])} for o in outs]
