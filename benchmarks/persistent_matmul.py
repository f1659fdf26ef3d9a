"""A candidate for the batch-invariant matmul, tried by invariant_kernel_probe.py before it goes into
loraflow/invariant_kernels.py: persistent (one program per SM walking the tiles) with TMA-fed tiles
(host-side tensor descriptors, so a CUDA graph can hold the launch). Each output element still sums
its K blocks in order with one configuration, whatever M is: batch-invariant as `matmul` is. On the
H200 at M = 256..512 the launch-per-tile kernel reaches 65-75% of cuBLAS (generate-h200.md, Run 6);
persistence removes the last partial wave and TMA the address arithmetic.

    TRITON_INTERPRET=1 python3 benchmarks/persistent_matmul.py    # checks it on CPU: close to torch, rows invariant
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from loraflow.invariant_kernels import grouped_tile


@triton.jit
def _persistent_kernel(a_desc, w_desc, c_desc, M, N, K, NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):  # out-of-range rows and columns arrive as zeros
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


def matmul(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, ...], programs: int | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T with one (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages); TMA needs
    N and K whose rows are multiples of 16 bytes, as every 8B shape is."""
    block_m, block_n, block_k, group_m, warps, stages = config
    M, K = x.shape
    N = weight.shape[0]
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    programs = programs or (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4)
    programs = min(programs, triton.cdiv(M, block_m) * triton.cdiv(N, block_n))
    _persistent_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        TensorDescriptor.from_tensor(c, [block_m, block_n]), M, N, K, NUM_PROGRAMS=programs, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return c


if __name__ == "__main__":
    import os
    on_cpu = os.environ.get("TRITON_INTERPRET") == "1"
    dev, h = ("cpu", torch.float16) if on_cpu else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    a, w = torch.randn(70, 96, dtype=h, device=dev), torch.randn(176, 96, dtype=h, device=dev) / 10  # TMA: rows 16-byte aligned
    cfg = (32, 32, 32, 4, 4, 2)
    full = matmul(a, w, cfg)
    assert (full.float() - a.float() @ w.float().T).abs().max() < 5e-2
    assert torch.equal(matmul(a[5:6].contiguous(), w, cfg), full[5:6]), "one row differs from the batch"
    assert torch.equal(matmul(a[3:40].contiguous(), w, cfg), full[3:40]), "37 rows differ from the batch"
    print("OK", h, dev)
