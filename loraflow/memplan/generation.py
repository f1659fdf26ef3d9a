"""Memory for greedy generation (the merge check and evaluate): the KV cache, a prefill chunk and the
last-position logits beside the weights, and the largest batch that fits."""
from __future__ import annotations

from .costs import SAFETY_MARGIN
from .estimate import Arch

# loraflow.generation prefills a batch in chunks of at most this many tokens (packed, no padding;
# a longer prompt goes alone)
PREFILL_CHUNK_TOKENS = 16384


def generation_bytes(arch: Arch, batch: int, prompt_len: int, new_tokens: int, act_bytes: int = 2) -> float:
    """GPU memory greedy decoding needs beside the weights: the KV cache (every row's slot holds the
    longest prompt plus the new tokens), one layer's working tensors for a prefill chunk, and
    last-position logits (prefill keeps only those)."""
    cache = arch.layers * 2 * arch.kv_heads * arch.head_dim * (prompt_len + new_tokens) * batch * act_bytes
    chunk_tokens = min(batch * prompt_len, max(PREFILL_CHUNK_TOKENS, prompt_len))
    prefill = chunk_tokens * (3 * arch.intermediate + 4 * arch.hidden) * act_bytes
    logits = batch * arch.vocab * 4 * 2
    return cache + prefill + logits

# On the H200, 8B at batch 512 generated 13% faster than at 256 (12,416 against 11,010 tok/s; its
# 97.6 GiB peak as generation_bytes predicts it), benchmarks/results/generate-h200.md, Run 6
BATCH_CAP = 512


def generation_batch(arch: Arch, prompt_len: int, new_tokens: int, free_bytes: float, rows: int,
                     act_bytes: int = 2, cap: int = BATCH_CAP) -> int:
    """The largest power-of-two batch (at most cap, and no more than the rows need) that fits the free
    memory less the safety margin."""
    batch = 1
    while (batch * 2 <= min(cap, max(rows, 1)) and
           generation_bytes(arch, batch * 2, prompt_len, new_tokens, act_bytes) <= free_bytes * (1 - SAFETY_MARGIN)):
        batch *= 2
    return batch
