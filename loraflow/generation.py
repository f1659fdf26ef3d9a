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


@torch.no_grad()
def greedy_decode_static(model, prompts: list[list[int]], *, pad_id: int, eos_id: int | None, max_new_tokens: int,
                         batch_size: int, compile_step: bool = False, check_every: int = 16) -> list[dict]:
    """greedy_generate_ids with our own decode loop over one static KV cache, so every decode step has
    the same shapes (batch_size x (longest prompt + max_new_tokens)) and compiles once into a CUDA
    graph (compile_step, CUDA; it costs about 35 s per model for the 8B, so it pays off only on large
    eval sets). Rows are sorted by length and left-padded; a short last batch is filled with copies
    of its last row, whose outputs are dropped."""
    from transformers import StaticCache
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    width = -(-max(map(len, prompts)) // 64) * 64
    cache_len = width + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compile_step else model.forward
    dev = model.device
    results: list[dict | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = idx + [idx[-1]] * (batch_size - len(idx))
        lengths = torch.tensor([len(prompts[i]) for i in rows])
        # every batch prefills the common width: a prefill that starts later in the static cache gave
        # different logits in transformers 5.17 (tests/test_generation.py caught it)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.ones((batch_size, cache_len), dtype=torch.long)  # generated positions: causality masks the future
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
            mask[r, :width - len(prompts[i])] = 0
        ids, mask, lengths = ids.to(dev), mask.to(dev), lengths.to(dev)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        cache.reset()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       cache_position=torch.arange(width, device=dev), use_cache=True, logits_to_keep=1).logits[:, -1]
        new = torch.full((batch_size, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        for k in range(max_new_tokens):
            token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1))
            new[:, k] = token
            if eos_id is not None:
                done |= token == eos_id
                if (k + 1) % check_every == 0 and bool(done.all()):
                    break
            if k + 1 == max_new_tokens:
                break
            logits = step(input_ids=token[:, None], attention_mask=mask, position_ids=(lengths + k)[:, None],
                          past_key_values=cache, cache_position=torch.tensor([width + k], device=dev),
                          use_cache=True).logits[:, -1].clone()
        for i, out in zip(idx, new.tolist()):
            ended = eos_id is not None and eos_id in out
            results[i] = {"ids": out[:out.index(eos_id)] if ended else out, "ended": ended}
    return results


def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[dict]:
    """For each prompt: the decoded text up to the first end-of-turn, whether one came before the
    cap, and the number of new tokens."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = greedy_decode_static(model, encoded, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                max_new_tokens=max_new_tokens, batch_size=min(batch_size, len(encoded)))
    return [{"text": tokenizer.decode(o["ids"], skip_special_tokens=True).strip(), "ended": o["ended"],
             "new_tokens": len(o["ids"]) + int(o["ended"])} for o in outs]
