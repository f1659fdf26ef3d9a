"""Memory for greedy generation (the merge check and evaluate): the KV cache, a prefill chunk and the
last-position logits beside the weights, and the largest batch that fits. The batch-invariant loop's
cache is ragged (each row sized by its own prompt); HF generate's pads each batch to its longest."""
from __future__ import annotations

from .costs import SAFETY_MARGIN
from .estimate import Arch

# loraflow.generation prefills a batch in chunks of at most this many tokens (packed, no padding;
# a longer prompt goes alone)
PREFILL_CHUNK_TOKENS = 16384


def batches(lengths: list[int], batch: int) -> list[list[int]]:
    """The prompt lengths of each batch as the generation loop runs them: sorted, in runs of `batch`, a
    short last run filled with copies of its last row (the decode step keeps one shape)."""
    ordered = sorted(lengths)
    runs = [ordered[i:i + batch] for i in range(0, len(ordered), batch)]
    return [run + run[-1:] * (batch - len(run)) for run in runs]


def cache_slots(lengths: list[int], batch: int, new_tokens: int, ragged: bool = True) -> int:
    """KV cache positions a loop over these prompts needs at once: the largest batch's. Ragged (the
    batch-invariant loop's RowKVCache), each row holds its own prompt plus the new tokens; otherwise (HF
    generate, left-padded) each row holds its batch's longest prompt plus the new tokens."""
    return _largest_batch_slots(batches(lengths, batch), batch, new_tokens, ragged)


def _largest_batch_slots(runs: list[list[int]], batch: int, new_tokens: int, ragged: bool) -> int:
    need = (sum(run) if ragged else len(run) * max(run) for run in runs)
    return max(need, default=0) + batch * new_tokens


def generation_bytes(arch: Arch, batch: int, lengths: list[int], new_tokens: int, act_bytes: int = 2,
                     ragged: bool = True) -> float:
    """GPU memory greedy decoding of prompts of these lengths needs beside the weights: the KV cache
    (`cache_slots`), one layer's working tensors for a prefill chunk, and last-position logits (prefill
    keeps only those)."""
    runs = batches(lengths, batch)
    slots = _largest_batch_slots(runs, batch, new_tokens, ragged)
    cache = arch.layers * 2 * arch.kv_heads * arch.head_dim * slots * act_bytes
    most_prompt_tokens = max((sum(run) for run in runs), default=0)
    chunk_tokens = min(most_prompt_tokens, max(PREFILL_CHUNK_TOKENS, max(lengths, default=0)))
    prefill = chunk_tokens * (3 * arch.intermediate + 4 * arch.hidden) * act_bytes
    logits = batch * arch.vocab * 4 * 2
    return cache + prefill + logits

# On the H200, 8B at batch 512 generated 13% faster than at 256 (12,416 against 11,010 tok/s),
# benchmarks/results/generate-h200.md, Run 6
BATCH_CAP = 512


def generation_batch(arch: Arch, lengths: list[int], new_tokens: int, free_bytes: float, act_bytes: int = 2,
                     cap: int = BATCH_CAP, ragged: bool = True) -> int:
    """The largest power-of-two batch (at most cap, and no more than the rows need) that fits the free
    memory less the safety margin."""
    batch = 1
    while (batch * 2 <= min(cap, max(len(lengths), 1)) and
           generation_bytes(arch, batch * 2, lengths, new_tokens, act_bytes, ragged)
           <= free_bytes * (1 - SAFETY_MARGIN)):
        batch *= 2
    return batch
