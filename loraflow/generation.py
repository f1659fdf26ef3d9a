"""Batched greedy generation, shared by the merge check, the evaluate stage and the benchmarks.

Prompts are sorted by length so each batch pads little, and results come back in the caller's order.
Names say what comes back and which path made it:
- `generate_texts`: decoded texts from text prompts (what the merge check and evaluate call), through
- `generate_ids`: new token ids from token-id prompts, on the batch-invariant path where the model
  type allows it, else on HF generate;
- `generate_ids_batch_invariant`: each row's tokens exactly those it gets alone (in bf16 on a GPU
  too), prompts packed with no padding in prefill, decode step in a CUDA graph on a GPU;
- `generate_ids_hf`: HF `generate`, left-padded; for model types the batch-invariant loop does not
  take, and the one-row peer in benchmarks/generate_bench.py.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from loraflow.memplan import PREFILL_CHUNK_TOKENS, cache_slots

log = logging.getLogger("loraflow.generation")


@torch.no_grad()
def generate_ids_hf(model, prompts: list[list[int]], *, pad_id: int, stop_ids: Sequence[int], max_new_tokens: int,
                    batch_size: int) -> list[dict]:
    """For each prompt (token ids): the new ids up to the first of stop_ids, and whether one came before
    the cap. HF `generate`, left-padded, dynamic KV cache."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict | None] = [None] * len(prompts)
    progress = BatchProgress(len(prompts))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n:] = torch.as_tensor(prompts[i])
            mask[row, width - n:] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)
        for i, new in zip(idx, out[:, width:].tolist()):
            results[i] = until_stop(new, stop_ids)
        progress.add(len(idx))
    return results


class BatchProgress:
    """Rows generated so far, logged after a batch (at most every `every_s` seconds, and at the end)
    with an estimate of the time left, so a long evaluation shows it is moving."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.rows, self.every_s = total, 0, every_s
        self.started = self.logged = time.perf_counter()

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.perf_counter()
        if self.rows < self.total and now - self.logged < self.every_s:
            return
        self.logged, elapsed = now, now - self.started
        left = elapsed / self.rows * (self.total - self.rows)
        log.info("generated %d/%d rows (%d%%) in %.0f s%s", self.rows, self.total, 100 * self.rows // self.total,
                 elapsed, f", about {left:.0f} s left" if self.rows < self.total else "")


def until_stop(ids: list[int], stop_ids: Sequence[int]) -> dict:
    """The generated ids up to the first of stop_ids, and whether one came before the cap."""
    stops = set(stop_ids)
    first = next((k for k, t in enumerate(ids) if t in stops), None)
    return {"ids": ids if first is None else ids[:first], "ended": first is not None}


@torch.no_grad()
def generate_ids_batch_invariant(model, prompts: list[list[int]], *, pad_id: int, stop_ids: Sequence[int], max_new_tokens: int,
                       batch_size: int, cuda_graph: bool | None = None, check_every: int = 16,
                       prefill_tokens: int = PREFILL_CHUNK_TOKENS) -> list[dict]:
    """generate_ids_hf's result, batch-invariant and fast: each row is computed exactly as it would be alone
    (loraflow.batch_invariant), so the result does not depend on batch_size.

    Rows are sorted by length; each row's KV cache is a run of slots sized by its own prompt and the new
    tokens, from its position 0 (memplan.cache_slots sizes the pool). Prefill packs
    the rows' prompts into one sequence, no padding, in chunks of at most `prefill_tokens` tokens
    (a longer prompt goes alone). The decode step has one shape
    for every batch (a short last batch is filled with copies of its last row, dropped after), so on
    CUDA it is captured once into a CUDA graph and replayed: no Python or launch cost per token.
    The loop stops early once every row has emitted one of stop_ids (checked every `check_every` tokens)."""
    from loraflow.batch_invariant import batch_invariant
    dev = model.device
    cuda_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    token = torch.full((batch_size,), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(batch_size, dtype=torch.bool, device=dev)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long, device=dev)
    # one spare column takes whatever the graph's warm-up calls record past the last token
    new = torch.full((batch_size, max_new_tokens + 1), pad_id, dtype=torch.long, device=dev)
    k = torch.zeros(1, dtype=torch.long, device=dev)  # index of the token being recorded

    cache_kwarg = cache_argument(decoder)

    def forward(ids, position_ids):
        return decoder(input_ids=ids, position_ids=position_ids, use_cache=True, loraflow_cache=cache,
                       **{cache_kwarg: cache}).last_hidden_state

    def record(logits):
        nxt = torch.where(done, pad_id, logits.argmax(-1))
        new.index_copy_(1, k, nxt[:, None])
        if stop_ids:
            done.logical_or_(torch.isin(nxt, stops))
        token.copy_(nxt)
        k.add_(1).clamp_(max=max_new_tokens)

    def decode_step():  # everything on the device, so a CUDA graph can hold it
        hidden = forward(token[:, None], cache.begin_decode())[:, -1]
        record(head(hidden))  # lm_head with the decode configuration too
        cache.positions.add_(1)

    results: list[dict | None] = [None] * len(prompts)
    progress = BatchProgress(len(prompts))
    slots = cache_slots([len(p) for p in prompts], batch_size, max_new_tokens)
    with batch_invariant(model, batch_size, slots) as cache:
        step = capture(decode_step) if cuda_graph and max_new_tokens > 1 else decode_step
        for first in range(0, len(order), batch_size):
            idx = order[first:first + batch_size]
            rows = idx + [idx[-1]] * (batch_size - len(idx))
            done.zero_()
            k.zero_()
            new.fill_(pad_id)  # an early stop leaves later columns unwritten
            cache.positions.zero_()
            logits, row_lengths = [], [len(prompts[i]) for i in rows]
            cache.place_rows([n + max_new_tokens for n in row_lengths])
            for lo, hi in prefill_chunks(row_lengths, prefill_tokens):
                ids = torch.tensor([t for r in rows[lo:hi] for t in prompts[r]])[None].to(dev)
                hidden = forward(ids, cache.begin_prefill(lo, row_lengths[lo:hi]))[0]
                last = [start + n - 1 for _, start, n in cache.segments]  # each row's last prompt token
                logits.append(head(hidden[torch.tensor(last, device=dev)]))
            record(torch.cat(logits))
            cache.positions.copy_(torch.tensor(row_lengths))
            for n in range(1, max_new_tokens):
                if stop_ids and n % check_every == 0 and bool(done.all()):
                    break
                step()
            for i, out in zip(idx, new[:, :max_new_tokens].tolist()):
                results[i] = until_stop(out, stop_ids)
            progress.add(len(idx))
    return results


def prefill_chunks(lengths: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Split rows into [lo, hi) runs of at most max_tokens prompt tokens together (a prefill call packs a
    run's prompts with no padding); a row longer than that goes alone."""
    chunks, lo, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > lo and tokens + n > max_tokens:
            chunks.append((lo, i))
            lo, tokens = i, 0
        tokens += n
    chunks.append((lo, len(lengths)))
    return chunks


def capture(fn):
    """fn captured into a CUDA graph; returns its replay. Two warm-up calls on a side stream first
    (they compile the kernels and settle the allocator), as torch.cuda.graphs requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def generate_ids(model, prompts: list[list[int]], **kw) -> list[dict]:
    """The batch-invariant loop where the model type allows it, else HF generate (batched; rows are
    then not guaranteed to match one-at-a-time in reduced precision)."""
    from loraflow.batch_invariant import unsupported_reason
    reason = unsupported_reason(model)
    if reason is None:
        return generate_ids_batch_invariant(model, prompts, **kw)
    log.warning("generation: HF generate, not the batch-invariant loop: %s", reason)
    return generate_ids_hf(model, prompts, **kw)


def generate_texts(model, tokenizer, prompts: list[str], *, stop_ids: Sequence[int], max_new_tokens: int,
                   batch_size: int, end_of_turn: str | None = None) -> list[dict]:
    """For each prompt: the decoded text up to the first end-of-turn, whether one came before the
    cap, and the number of new tokens. stop_ids: every id that ends a turn (loraflow.chat_format);
    end_of_turn: the end-of-turn text, which also ends the text where it is several tokens (a base
    model's named template)."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = generate_ids(model, encoded, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids,
                        max_new_tokens=max_new_tokens, batch_size=min(batch_size, len(encoded)))
    results = []
    for o in outs:
        text, ended = tokenizer.decode(o["ids"], skip_special_tokens=True), o["ended"]
        raw = tokenizer.decode(o["ids"], skip_special_tokens=False) if end_of_turn else ""
        if end_of_turn and end_of_turn in raw:  # an end-of-turn of several tokens: no stop id caught it
            text, ended = raw.split(end_of_turn, 1)[0], True
            for special in tokenizer.all_special_tokens:
                text = text.replace(special, "")
        results.append({"text": text.strip(), "ended": ended, "new_tokens": len(o["ids"]) + int(o["ended"])})
    return results


def cache_argument(decoder) -> str:
    """The decoder's name for its KV cache: `cache` from transformers 5.2x, where `past_key_values`
    warns that it is deprecated; `past_key_values` before (the GPU image's 5.17)."""
    import inspect
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
