"""Batched greedy generation, shared by the merge check and the evaluate stage.

Prompts are sorted by length so each batch pads little, left-padded so every row's next token
sits in the last column, and returned in the caller's order.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[dict]:
    """For each prompt: the decoded text up to the first end-of-turn, whether one came before the
    cap, and the number of new tokens."""
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    results: list[dict | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        for i, ids in zip(idx, new):
            ended = eos in ids
            ids = ids[:ids.index(eos)] if ended else ids
            results[i] = {"text": tokenizer.decode(ids, skip_special_tokens=True).strip(), "ended": ended,
                          "new_tokens": len(ids) + int(ended)}
    return results
