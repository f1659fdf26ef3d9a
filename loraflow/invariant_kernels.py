"""Batch-invariant GPU kernels (Triton) for generation: a row's result never depends on which other
rows share its batch, nor on how much padding they bring.

cuBLAS and PyTorch's reductions pick their algorithm (tile shape, split-K, how many blocks share a
row) from the whole tensor's shape, so the same row rounds differently at batch 1 and at batch 256;
in bf16 on near-tied logits that flips greedy tokens. Here every kernel has one fixed configuration
and reduces each row in one fixed order:
- `matmul` / `matmul_group`: no split-K; each output element sums its K blocks in order, whatever M
  is, and whichever weights share the launch. On Hopper (and later) the tiles come through TMA and one
  program per SM walks them (persistent); elsewhere, or where a weight's rows are not 16-byte aligned,
  a program per tile loads them by pointer. Which kernel runs is decided by the device and the
  weights, never by M, so a row alone and in a batch take the same one;
- `rms_norm`: one program per row; `rope`, `silu_mul`: elementwise, rounded as the PyTorch ops round;
- `prefill_attention`: rows packed into one sequence with no padding, one program per block of a row's
  queries and head; `decode_attention`: one program per (row, KV head). The caches are one pool of
  token slots per layer, each row holding as many as its own prompt and new tokens need (no row is
  sized by the longest); keys are walked from the row's first slot in fixed blocks, and keys past a
  query's position are masked to exact zeros, so where a row sits and what lies past it add nothing.
Prefill and decode use different attention kernels, chosen by the phase the caller names, never by
the shapes, so a one-row run and a batched run take the same kernel for the same token.
The kernels also run under TRITON_INTERPRET=1 on CPU, which is how CI checks them.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages), chosen by the kernel, the phase and the weight's
# shape, never by M: a row alone and in a batch of 256 meet the same weight in the same phase, so they
# take the same configuration, and a different tile or warp count (which may change the MMA instruction
# and so the rounding) never comes from the batch. The caller names the phase (prefill or decode). Picked
# by benchmarks/invariant_kernel_probe.py on the H200 at the 8B's shapes as the generation loop calls them
# (q/k/v and gate/up as one launch), decode at M = 256 and 512 together, prefill at M = 16,384
# (benchmarks/results/generate-h200.md: Run 6 for "pointer", Run 7 for "tma"); other shapes take the
# kernel's and phase's default.
MM_DEFAULT = {("pointer", False): (128, 128, 64, 8, 8, 3), ("pointer", True): (128, 64, 64, 8, 4, 4),
              ("tma", False): (128, 256, 64, 8, 8, 3), ("tma", True): (128, 128, 128, 8, 8, 3)}
MM_BY_SHAPE: dict[tuple[str, bool, int, int], tuple[int, ...]] = {  # (kernel, decode, N, K): configuration
    ("pointer", True, 6144, 4096): (128, 128, 128, 8, 8, 3),  # decode q/k/v
    ("pointer", True, 4096, 4096): (128, 64, 64, 8, 4, 4),  # decode o
    ("pointer", True, 28672, 4096): (128, 128, 64, 8, 8, 3),  # decode gate/up
    ("pointer", True, 4096, 14336): (128, 64, 64, 8, 4, 4),  # decode down
    ("pointer", True, 128256, 4096): (256, 128, 64, 8, 8, 3),  # decode lm_head
    ("pointer", False, 6144, 4096): (128, 256, 64, 8, 8, 4),  # prefill q/k/v
    ("pointer", False, 4096, 4096): (256, 128, 64, 8, 8, 3),  # prefill o
    ("pointer", False, 28672, 4096): (256, 128, 64, 8, 8, 3),  # prefill gate/up
    ("pointer", False, 4096, 14336): (256, 128, 64, 8, 8, 3),  # prefill down
    ("tma", True, 28672, 4096): (128, 256, 64, 8, 8, 3),  # decode gate/up
    ("tma", True, 128256, 4096): (128, 256, 64, 8, 8, 3),  # decode lm_head
}
# "auto": TMA on Hopper and later where the shapes allow it; "tma" / "pointer" force one (tests, A/Bs)
MATMUL_KERNEL = "auto"
PREFILL_BLOCK_M, PREFILL_BLOCK_N = 64, 64
DECODE_BLOCK_N, DECODE_WARPS, DECODE_STAGES = 64, 4, 3  # stages: pipelining depth only, no effect on the sums


def matmul_config(n: int, k: int, decode: bool, kernel: str) -> tuple[int, ...]:
    """The configuration for a weight of N outputs and K inputs (a group's N is its members' sum)."""
    return MM_BY_SHAPE.get((kernel, decode, n, k), MM_DEFAULT[kernel, decode])


def matmul_kernel(x: torch.Tensor, weights: list[torch.Tensor]) -> str:
    """"tma" or "pointer" for these weights on x's device: from the device and the weights alone, so every
    batch of rows takes the same kernel. TMA needs 16-byte aligned rows and bases (an input that is not
    is copied to an aligned one; a weight that is not sends the weights to the pointer kernel)."""
    widths, K = [w.shape[0] for w in weights], x.shape[-1]
    aligned = (K % 8 == 0 and all(n % 8 == 0 for n in widths) and all(w.stride(0) % 8 == 0 for w in weights)
               and all(w.data_ptr() % 16 == 0 for w in weights))
    if MATMUL_KERNEL != "auto":
        assert MATMUL_KERNEL == "pointer" or aligned, "the TMA kernel needs 16-byte aligned rows"
        return MATMUL_KERNEL
    return "tma" if aligned and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9 else "pointer"


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number `tile`, in grouped order: tiles that share a weight
    tile run together, so it is read from HBM once."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _matmul_kernel(a_ptr, w1_ptr, w2_ptr, w3_ptr, b1_ptr, b2_ptr, b3_ptr, c_ptr, M, N1, N2, N3, K,
                   stride_am, stride_w1, stride_w2, stride_w3, stride_cm,
                   HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Up to three weights that read the same input (q/k/v, gate/up) in one launch, their outputs side by
    # side in c. A column tile belongs to one weight; each output element sums its K blocks in order, so a
    # column comes out the same whichever weights share the launch and whatever M is.
    pid = tl.program_id(0)
    t1, t2 = tl.cdiv(N1, BLOCK_N), tl.cdiv(N2, BLOCK_N)
    num_m, num_n = tl.cdiv(M, BLOCK_M), t1 + t2 + tl.cdiv(N3, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    if pid_n < t1:
        w_ptr, b_ptr, n_w, stride_wn, tile, col0 = w1_ptr, b1_ptr, N1, stride_w1, pid_n, 0
    elif pid_n < t1 + t2:
        w_ptr, b_ptr, n_w, stride_wn, tile, col0 = w2_ptr, b2_ptr, N2, stride_w2, pid_n - t1, N1
    else:
        w_ptr, b_ptr, n_w, stride_wn, tile, col0 = w3_ptr, b3_ptr, N3, stride_w3, pid_n - t1 - t2, N1 + N2
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x N can pass 2**31
    offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
            w = tl.load(w_ptrs, mask=offs_n[None, :] < n_w, other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_n[None, :] < n_w) & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < n_w, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + col0 + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_w))


@triton.jit
def _weight_tiles(a_desc, w_desc, b_ptr, c_desc, M, N, K, tiles_before, num_programs, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # One weight's output tiles, walked by the persistent programs as if they followed the previous
    # weights' tiles in one list (tile t goes to program t mod programs), so a group has one last
    # partial wave, not one per weight. A tile sums its K blocks in order whichever program runs it.
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first = (tl.program_id(0) + num_programs - tiles_before % num_programs) % num_programs
    for tile in tl.range(first, num_m * num_n, num_programs, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):  # rows, columns and K past the end arrive as zeros
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        if HAS_BIAS:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))  # clipped at M and N


@triton.jit
def _tma_matmul_kernel(a_desc, w1_desc, w2_desc, w3_desc, b1_ptr, b2_ptr, b3_ptr, c1_desc, c2_desc, c3_desc,
                       M, N1, N2, N3, K, num_programs, WEIGHTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # the persistent, TMA-fed form of _matmul_kernel: each weight has its own descriptors, so a tile never
    # crosses from one weight's columns into the next, and the store is clipped at each weight's width
    num_m = tl.cdiv(M, BLOCK_M)
    _weight_tiles(a_desc, w1_desc, b1_ptr, c1_desc, M, N1, K, 0, num_programs, HAS_BIAS, BLOCK_M, BLOCK_N,
                  BLOCK_K, GROUP_M)
    if WEIGHTS > 1:
        _weight_tiles(a_desc, w2_desc, b2_ptr, c2_desc, M, N2, K, num_m * tl.cdiv(N1, BLOCK_N), num_programs,
                      HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    if WEIGHTS > 2:
        _weight_tiles(a_desc, w3_desc, b3_ptr, c3_desc, M, N3, K,
                      num_m * (tl.cdiv(N1, BLOCK_N) + tl.cdiv(N2, BLOCK_N)), num_programs, HAS_BIAS, BLOCK_M,
                      BLOCK_N, BLOCK_K, GROUP_M)


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """Persistent programs: one per SM (3 under the interpreter, so the checks walk wrapped tile lists)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def _tma_matmul(a: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor], has_bias: bool,
                outs: list[torch.Tensor], config: tuple[int, ...]) -> None:
    """outs[i] = a @ ws[i].T (+ bs[i]), each out a column slice of one (M, sum of N) output."""
    block_m, block_n, block_k, group_m, warps, stages = config
    M, K = a.shape
    widths = [w.shape[0] for w in ws]
    if a.data_ptr() % 16:  # a view starting mid-row: TMA needs an aligned base
        a = a.clone()
    cs = [TensorDescriptor.from_tensor(out, [block_m, block_n]) for out in outs]
    wds = [TensorDescriptor.from_tensor(w, [block_n, block_k]) for w in ws]
    tiles = triton.cdiv(M, block_m) * sum(triton.cdiv(n, block_n) for n in widths)
    programs = min(_programs(a.device), tiles)
    pad = 3 - len(ws)
    _tma_matmul_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [block_m, block_k]), *wds, *[wds[0]] * pad, *bs, *[bs[0]] * pad,
        *cs, *[cs[0]] * pad, M, *widths, *[0] * pad, K, programs, WEIGHTS=len(ws),
        HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps,
        num_stages=stages)


def matmul_group(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                 decode: bool = False) -> list[torch.Tensor]:
    """[x @ w.T + b for each weight], as nn.Linear computes them, in one launch (at most three weights of
    the same K, all with a bias or none); each result is a view into one (..., sum of N) output."""
    assert 1 <= len(weights) <= 3 and len(biases) == len(weights)
    has_bias = biases[0] is not None
    assert all((b is not None) == has_bias for b in biases), "all with a bias or none"
    K, widths = x.shape[-1], [w.shape[0] for w in weights]
    a = x.reshape(-1, K).contiguous()
    ws = [w.contiguous() for w in weights]
    bs = [b if b is not None else w for b, w in zip(biases, ws)]
    M = a.shape[0]
    c = torch.empty((M, sum(widths)), dtype=x.dtype, device=x.device)
    bounds = [0] + [sum(widths[:i + 1]) for i in range(len(widths))]
    kernel = matmul_kernel(a, ws)
    config = matmul_config(sum(widths), K, decode, kernel)
    if kernel == "tma":
        _tma_matmul(a, ws, bs, has_bias, [c[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])], config)
    else:
        block_m, block_n, block_k, group_m, warps, stages = config
        ws, bs, ns = ws + [ws[0]] * (3 - len(ws)), bs + [bs[0]] * (3 - len(bs)), widths + [0] * (3 - len(widths))
        grid = (triton.cdiv(M, block_m) * sum(triton.cdiv(n, block_n) for n in widths),)
        _matmul_kernel[grid](a, *ws, *bs, c, M, *ns, K, a.stride(0), *(w.stride(0) for w in ws), c.stride(0),
                             HAS_BIAS=has_bias, EVEN_K=K % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    c = c.view(*x.shape[:-1], sum(widths))
    return [c[..., lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, decode: bool = False) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T + bias, as nn.Linear computes it, with the phase's configuration."""
    return matmul_group(x, [weight], [bias], decode)[0]


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * N + offs, mask=offs < N, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    normed = (x * (1.0 / tl.sqrt(var + eps))).to(y_ptr.dtype.element_ty)   # as LlamaRMSNorm: cast, then weight
    w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    tl.store(y_ptr + row * N + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=offs < N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    N = x.shape[-1]
    a = x.reshape(-1, N).contiguous()
    y = torch.empty_like(a)
    _rms_norm_kernel[(a.shape[0],)](a, weight, y, N, eps, BLOCK=triton.next_power_of_2(N))
    return y.view(x.shape)


@triton.jit
def _rounded(x, dt: tl.constexpr):
    """fp32 x rounded to dt and back, as a PyTorch op of dtype dt rounds its result. For bf16 the rounding
    (to nearest, ties to even) is done on the bits: a cast pair may be folded away by the compiler,
    which then fuses the product into the next add (an FMA) and rounds differently."""
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dt).to(tl.float32)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, I, stride_g, stride_u, BLOCK: tl.constexpr):
    # one block of one row: silu(gate) rounded to the dtype as torch's silu rounds it, then times up
    # (a product of two bf16 values is exact in fp32, so its one rounding is torch's)
    row, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    silu = _rounded(tl.math.div_rn(g, 1.0 + tl.exp(-g)), dt)
    tl.store(o_ptr + row * I + offs, (silu * u).to(dt), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as the Llama-style MLP computes it, in one launch (was two elementwise kernels and
    an intermediate); gate and up (..., I) with a contiguous last dim, e.g. the halves of matmul_group's output."""
    I = gate.shape[-1]
    g, u = gate.reshape(-1, I), up.reshape(-1, I)
    assert g.stride(-1) == 1 and u.stride(-1) == 1
    out = torch.empty((g.shape[0], I), dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(g.shape[0], triton.cdiv(I, block))](g, u, out, I, g.stride(0), u.stride(0), BLOCK=block)
    return out.view(gate.shape)


@triton.jit
def _rope_heads(x, o, stride_xh, stride_oh, n_heads, c1, c2, s1, s2, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    # every head of one token: HF's (x * cos) + (rotate_half(x) * sin), each product and the sum rounded
    # to the input dtype as PyTorch's elementwise ops round them, so the result is HF's bit for bit
    heads, offs = tl.arange(0, BLOCK_H)[:, None], tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    x1 = tl.load(x + heads * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + heads * stride_xh + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    dt = o.dtype.element_ty
    out1 = (_rounded(x1 * c1, dt) + _rounded(-x2 * s1, dt)).to(dt)
    out2 = (_rounded(x2 * c2, dt) + _rounded(x1 * s2, dt)).to(dt)
    tl.store(o + heads * stride_oh + offs, out1, mask=mask)
    tl.store(o + heads * stride_oh + HALF + offs, out2, mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, H, HKV, L, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sc_b,
                 sc_l, sqo_b, sqo_h, sqo_l, sko_b, sko_h, sko_l, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 HALF: tl.constexpr):
    # one token, all its query and key heads: its cos/sin are loaded once, and a program has whole tiles
    # of work (a program per head was a grid of 64-element programs)
    pid = tl.program_id(0)
    b, l = pid // L, pid % L
    offs = tl.arange(0, HALF)[None, :]
    c = cos_ptr + b * sc_b + l * sc_l
    s = sin_ptr + b * sc_b + l * sc_l
    c1, c2 = tl.load(c + offs).to(tl.float32), tl.load(c + HALF + offs).to(tl.float32)
    s1, s2 = tl.load(s + offs).to(tl.float32), tl.load(s + HALF + offs).to(tl.float32)
    _rope_heads(q_ptr + b * sq_b + l * sq_l, qo_ptr + b * sqo_b + l * sqo_l, sq_h, sqo_h, H, c1, c2, s1, s2,
                BLOCK_HQ, HALF)
    _rope_heads(k_ptr + b * sk_b + l * sk_l, ko_ptr + b * sko_b + l * sko_l, sk_h, sko_h, HKV, c1, c2, s1, s2,
                BLOCK_HK, HALF)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb, queries and keys in one launch: q (B, H, L, D) and k (B, Hkv, L, D),
    any strides with a contiguous last dim; cos, sin (B, L, D). Each result is laid out as (B, L, heads, D)."""
    B, H, L, D = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    assert D % 2 == 0 and k.dtype == q.dtype and k.shape[0] == B and k.shape[2:] == q.shape[2:]
    Hkv = k.shape[1]
    qo = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    ko = torch.empty((B, L, Hkv, D), dtype=k.dtype, device=k.device).transpose(1, 2)
    _rope_kernel[(B * L,)](q, k, cos, sin, qo, ko, H, Hkv, L, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                           k.stride(1), k.stride(2), cos.stride(0), cos.stride(1), qo.stride(0), qo.stride(1),
                           qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), BLOCK_HQ=triton.next_power_of_2(H),
                           BLOCK_HK=triton.next_power_of_2(Hkv), HALF=D // 2)
    return qo, ko


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, L, HKV, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sc_h, sc_s,
                     BLOCK_H: tl.constexpr, D: tl.constexpr):
    # one token: its keys and values, every KV head, copied to its cache slot
    pid = tl.program_id(0)
    b, l = pid // L, pid % L
    heads, offs = tl.arange(0, BLOCK_H)[:, None], tl.arange(0, D)[None, :]
    mask = heads < HKV
    slot = heads * sc_h + tl.load(slot_ptr + pid).to(tl.int64) * sc_s + offs
    tl.store(kc_ptr + slot, tl.load(k_ptr + b * sk_b + heads * sk_h + l * sk_l + offs, mask=mask), mask=mask)
    tl.store(vc_ptr + slot, tl.load(v_ptr + b * sv_b + heads * sv_h + l * sv_l + offs, mask=mask), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache[h, slots[b, l]] = key[b, h, l] (and the same for values), in one launch for both: caches
    (Hkv, slots, D) of one layout; key and value (B, Hkv, L, D) with a contiguous last dim, a decode step's
    (B = batch, L = 1) or a packed prefill's (B = 1); slots (B, L), each token's cache slot."""
    B, Hkv, L, D = key.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and key.stride(-1) == 1
    assert value.stride(-1) == 1 and value.shape == key.shape and k_cache.shape[0] == Hkv
    slots = slots.contiguous()
    assert slots.shape == (B, L)
    _write_kv_kernel[(B * L,)](key, value, k_cache, v_cache, slots, L, Hkv, key.stride(0), key.stride(1),
                               key.stride(2), value.stride(0), value.stride(1), value.stride(2), k_cache.stride(0),
                               k_cache.stride(1), BLOCK_H=triton.next_power_of_2(Hkv), D=D)


@triton.jit
def _online_softmax_block(q, k, v, visible, scale, m_i, l_i, acc):
    """One key block of the online softmax, shared by both attention kernels: scores of the visible
    keys, the running max m_i and sum l_i rescaled, and the block's values added to acc. Masked keys
    give exactly 0 (so padding adds nothing), and a block with nothing visible rescales by exactly 1."""
    s = tl.dot(q, k) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attention_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, blocks_ptr, GROUPS, scale, sq_h, sq_l, sk_h, sk_s,
                              so_l, so_h, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # BLOCK_M queries of one row (blocks_ptr: the row's first cache slot, its first token in the packed
    # queries, its length, the block's first position). The row's queries sit at positions 0..length-1 and
    # its keys in the slots from its first: key n is visible to query m iff n <= m. Blocks start at
    # position 0 of each row, so a row's tiles are the same whichever rows are packed beside it.
    blk, h = tl.program_id(0), tl.program_id(1)
    slot0, start = tl.load(blocks_ptr + blk * 4), tl.load(blocks_ptr + blk * 4 + 1)
    length, m0 = tl.load(blocks_ptr + blk * 4 + 2), tl.load(blocks_ptr + blk * 4 + 3)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + h * sq_h + (start + offs_m)[:, None] * sq_l + offs_d[None, :], mask=offs_m[:, None] < length,
                other=0.0)
    k_base = k_ptr + slot0 * sk_s + (h // GROUPS) * sk_h
    v_base = v_ptr + slot0 * sk_s + (h // GROUPS) * sk_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum(m0 + BLOCK_M, length)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[None, :] * sk_s + offs_d[:, None], mask=offs_n[None, :] < hi, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=offs_n[:, None] < hi, other=0.0)
        m_i, l_i, acc = _online_softmax_block(q, k, v, offs_n[None, :] <= offs_m[:, None], scale, m_i, l_i, acc)
    out = acc / l_i[:, None]
    tl.store(o_ptr + (start + offs_m)[:, None] * so_l + h * so_h + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=offs_m[:, None] < length)


@triton.jit
def _attention_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, start_ptr, pos_ptr, B, HKV, GROUPS, scale,
                             sq_b, sq_h, sk_h, sk_s, so_b, so_h,
                             D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    # one new query per row, at position pos[b]; the row's keys sit in the slots from start[b]. The query
    # heads that share a KV head are the rows of one tile (padded to BLOCK_G >= 16 for the MMA), so each
    # K/V block is read once for all of them.
    # Programs start from the last row: the generation loop sorts rows by length, so the longest go
    # first and the last wave is of short rows, not a few long ones keeping the GPU waiting.
    pid = tl.program_id(0)
    b, kvh = B - 1 - pid // HKV, pid % HKV
    pos = tl.load(pos_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = kvh * GROUPS + offs_g
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=offs_g[:, None] < GROUPS, other=0.0)
    slot0 = tl.load(start_ptr + b).to(tl.int64)
    k_base = k_ptr + slot0 * sk_s + kvh * sk_h
    v_base = v_ptr + slot0 * sk_s + kvh * sk_h
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(0, pos + 1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = offs_n <= pos
        k = tl.load(k_base + offs_n[None, :] * sk_s + offs_d[:, None], mask=visible[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=visible[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_block(q, k, v, visible[None, :], scale, m_i, l_i, acc)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=offs_g[:, None] < GROUPS)


def prefill_blocks(segments: list[tuple[int, int, int]], device) -> torch.Tensor:
    """The prefill kernel's work list for packed rows, segments of (first cache slot, first token, length):
    one (first slot, first token, length, first position) per PREFILL_BLOCK_M queries of a row."""
    blocks = [(slot, start, n, m0) for slot, start, n in segments for m0 in range(0, n, PREFILL_BLOCK_M)]
    return torch.tensor(blocks, dtype=torch.long).to(device)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal attention of packed rows: q (1, H, T, D), each row's tokens in a run of T from its position 0;
    k, v the caches (Hkv, slots, D), which hold each row's keys in the slots from its first; blocks from
    `prefill_blocks`. Returns (1, T, H, D)."""
    _, H, T, D = q.shape
    assert q.shape[0] == 1 and k.stride(-1) == 1 and v.stride() == k.stride() and q.stride(-1) == 1
    o = torch.empty((1, T, H, D), dtype=q.dtype, device=q.device)
    _attention_prefill_kernel[(blocks.shape[0], H)](
        q, k, v, o, blocks, H // k.shape[0], scale, q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        o.stride(1), o.stride(2), D=D, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N)
    return o


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                     positions: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row: q (B, H, 1, D) at positions[b]; k, v (Hkv, slots, D), row b's keys in the slots
    from starts[b]. Returns (B, 1, H, D)."""
    B, H, Lq, D = q.shape
    Hkv = k.shape[0]
    groups = H // Hkv
    assert Lq == 1 and k.stride(-1) == 1 and v.stride() == k.stride() and q.stride(-1) == 1
    o = torch.empty((B, 1, H, D), dtype=q.dtype, device=q.device)
    _attention_decode_kernel[(B * Hkv,)](
        q, k, v, o, starts, positions, B, Hkv, groups, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        o.stride(0), o.stride(2), D=D, BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_N=DECODE_BLOCK_N,
        num_warps=DECODE_WARPS, num_stages=DECODE_STAGES)
    return o
