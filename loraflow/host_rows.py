"""Rows of a table in pinned CPU memory, gathered by the GPU itself (the input embedding kept in CPU memory).

fastpath.CpuEmbedding used to look the ids up on the CPU: copy the ids to the host, gather the rows
there, copy the result back from pageable memory. The first copy waits for the GPU to finish all it was
given (the previous micro-batch's backward), and the gather and the pageable copy back (3-5 GB/s) then
run with the GPU idle: about 50 ms per micro-batch of 8192 tokens at 8B, 6% of a QLoRA step (H100
trace, benchmarks/results/train-h200-unsloth.md, run 19).

Pinned host memory is mapped into the GPU's address space (unified virtual addressing on every 64-bit
CUDA platform), so a kernel can read the rows over PCIe itself: the ids stay on the GPU, the host waits
for nothing, and only the rows asked for cross the link (hidden x 2 bytes a token). The values are the
table's own, so the lookup is exact, as before.

The kernel runs on CPU tensors under TRITON_INTERPRET=1, which is how CI checks it
(tests/test_host_rows.py; run as a script on a GPU, the same file checks the pinned path).
"""
from __future__ import annotations

import torch

BLOCK = 1024  # elements of a row per program: 2 KB of bf16, four programs for an 8B row


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows(table, ids, out, width, BLOCK: tl.constexpr):
        token = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < width
        row = tl.load(ids + token).to(tl.int64)
        values = tl.load(table + row * width + cols, mask=keep)
        tl.store(out + token.to(tl.int64) * width + cols, values, mask=keep)
    return gather_rows


_compiled: list = []


def gather(table: torch.Tensor, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """table[ids] as a new tensor on `device` (the ids' device by default). table: (rows, width),
    contiguous, in pinned CPU memory (or anywhere under Triton's interpreter)."""
    import triton
    if not _compiled:
        _compiled.append(_kernel())
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError("gather needs a contiguous 2-D table")
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.numel(), table.shape[1]), dtype=table.dtype, device=device or ids.device)
    if flat.numel():
        grid = (flat.numel(), triton.cdiv(table.shape[1], BLOCK))
        _compiled[0][grid](table, flat, out, table.shape[1], BLOCK=BLOCK)
    return out.view(*ids.shape, table.shape[1])


def usable(table: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether the GPU can gather `ids` from `table` itself: ids on a CUDA device, the table pinned."""
    if not (ids.is_cuda and table.device.type == "cpu" and table.is_pinned()):
        return False
    import importlib.util
    return importlib.util.find_spec("triton") is not None  # installed with every CUDA build of torch
