"""Checks of loraflow.invariant_kernels: close to PyTorch, and each row bitwise the same alone as in a
padded batch. On CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, so tests/test_invariant_kernels.py runs this file in its own process), in fp16 since the
interpreter mishandles bf16 loads; on a GPU (`python3 tests/triton_interpret_check.py`, see
benchmarks/results/generate-h200.md) in bf16.
Prints OK when every check passes."""
import itertools
import os

import numpy as np
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from loraflow import invariant_kernels as ik  # noqa: E402
from loraflow.batch_invariant import reference_attention, reference_prefill_attention  # noqa: E402

torch.manual_seed(0)
interpreted = os.environ.get("TRITON_INTERPRET") == "1"
assert interpreted or torch.cuda.is_available(), "needs a GPU, or TRITON_INTERPRET=1"
h = torch.float16 if interpreted else torch.bfloat16
TOL = 2e-2 if interpreted else 6e-2
torch.set_default_device("cpu" if interpreted else "cuda")



def order_fixed_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """tl.dot as the GPU's MMA computes it for batch invariance: each output element is the accumulator
    plus its K products added in one fixed order, whatever row of the tile it sits in.

    Triton's interpreter hands tl.dot to np.matmul, and the host's BLAS picks its kernel by CPU and shape:
    OpenBLAS's Haswell and Zen kernels round a row differently by its position in the tile (a row 3 of a
    70-row batch is row 0 of a 37-row one), which says nothing about the kernel and fails on some hosts.
    Element-wise multiplies and adds are exactly rounded on every CPU, so this loop is order-fixed."""
    if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
        raise NotImplementedError("order_fixed_dot: 8-bit operands are not used by loraflow's kernels")
    acc_type = d.data.dtype
    lhs, rhs = a.data.astype(acc_type), b.data.astype(acc_type)
    # The block's own sum first, then the accumulator, as np.matmul(a, b) + d and the MMA do: so a tile
    # of another BLOCK_K still rounds differently here, as it would on the GPU.
    block_sum = np.zeros(d.data.shape, acc_type)
    for k in range(lhs.shape[-1]):
        block_sum += lhs[..., :, k:k + 1] * rhs[..., k:k + 1, :]
    return type(d)(d.data + block_sum, d.dtype.scalar)


if interpreted:
    from triton.runtime import interpreter

    # Fail loudly if a Triton upgrade moves the hook, rather than silently testing the host's BLAS again.
    assert hasattr(interpreter.InterpreterBuilder, "create_dot"), "Triton's interpreter has no create_dot to pin"
    interpreter.InterpreterBuilder.create_dot = order_fixed_dot


def same(a, b, what):
    assert torch.equal(a, b), f"{what}: not bitwise equal (max diff {(a.float() - b.float()).abs().max()})"


# matmul, by both kernels (the persistent TMA one and the pointer one): close to torch, and each row the
# same whatever rows come with it (K even and odd; bias; a ragged last row tile; TMA needs widths of 8)
for ik.MATMUL_KERNEL in ("tma", "pointer"):
    for K, bias, decode in [(128, False, False), (200, True, False), (200, True, True)]:
        a, w = torch.randn(70, K, dtype=h), torch.randn(152, K, dtype=h) / K ** 0.5
        b = torch.randn(152, dtype=h) if bias else None
        full = ik.matmul(a, w, b, decode)
        ref = a.float() @ w.float().T + (b.float() if bias else 0)
        assert (full.float() - ref).abs().max() < TOL, (ik.MATMUL_KERNEL, (full.float() - ref).abs().max())
        same(ik.matmul(a[5:6], w, b, decode), full[5:6], f"{ik.MATMUL_KERNEL} matmul one row")
        same(ik.matmul(a[3:40], w, b, decode), full[3:40], f"{ik.MATMUL_KERNEL} matmul 37 rows")
        same(ik.matmul(a.view(7, 10, K), w, b, decode).view(70, -1), full, f"{ik.MATMUL_KERNEL} matmul 3-d input")
    shifted = torch.empty(70 * K + 3, dtype=h)[3:].view(70, K)  # starts mid-allocation: TMA takes an aligned copy
    shifted.copy_(a)
    same(ik.matmul(shifted, w, b, decode), full, f"{ik.MATMUL_KERNEL} matmul unaligned input")

    # matmul_group (q/k/v, gate/up in one launch): each output bitwise what matmul gives that weight alone
    # (same configuration: neither N is in the table), its column tiles split where one weight ends (152 is
    # no multiple of a tile), the persistent programs' tile lists wrapping across weights, and each row the
    # same whatever rows come with it
    for widths, bias, decode in [((152, 40, 40), True, True), ((96, 96), False, False)]:
        a = torch.randn(70, 200, dtype=h)
        ws = [torch.randn(n, 200, dtype=h) / 200 ** 0.5 for n in widths]
        bs = [torch.randn(n, dtype=h) if bias else None for n in widths]
        kernel = ik.MATMUL_KERNEL
        assert all(ik.matmul_config(n, 200, decode, kernel) == ik.matmul_config(sum(widths), 200, decode, kernel)
                   for n in widths)
        group = ik.matmul_group(a, ws, bs, decode)
        for i, (w, b) in enumerate(zip(ws, bs)):
            same(group[i], ik.matmul(a, w, b, decode), f"{kernel} group member {i}")
            same(ik.matmul_group(a[5:6], ws, bs, decode)[i], group[i][5:6], f"{kernel} group member {i} one row")
ik.MATMUL_KERNEL = "auto"

# silu_mul: torch's silu(gate) * up (the MLP's formula) on the two halves of a group's output, a ragged
# last block. Not bitwise: the kernel's exp (numpy's here, an approximation on the GPU) and torch's
# differ in the last bit of fp32 now and then (15 of 77,000 here); within two units in the last place
# of the result, and each row the same alone as in the batch
gu = torch.randn(70, 2 * 1100, dtype=h) * 4
gate, up = gu[:, :1100], gu[:, 1100:]
fused, ref = ik.silu_mul(gate, up), torch.nn.functional.silu(gate) * up
ulp = (ref.float().abs() * torch.finfo(h).eps).clamp(min=torch.finfo(h).tiny)  # eps: 2 ** -mantissa bits
assert ((fused.float() - ref.float()).abs() <= 2 * ulp).all(), "silu_mul: more than two ulp from torch"
assert (fused != ref).float().mean() < 1e-3, "silu_mul: rounds differently from torch too often"
same(ik.silu_mul(gate[5:6], up[5:6]), fused[5:6], "silu_mul one row")

# rope: HF's apply_rotary_pos_emb bit for bit, on the transposed view the projections give
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
for H, Hkv in ((6, 3), (4, 2)):  # head counts short of a power of two too (Qwen2.5-7B has 28 and 4)
    B, L, D = 2, 5, 16
    q, k = torch.randn(B, L, H, D, dtype=h).transpose(1, 2), torch.randn(B, L, Hkv, D, dtype=h).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(hidden_size=H * D, num_attention_heads=H))(
        q, torch.arange(L).repeat(B, 1) + torch.tensor([[0], [7]]))
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = ik.rope(q, k, cos, sin)
    same(q_out, q_ref, f"rope q, {H} heads")
    same(k_out, k_ref, f"rope k, {Hkv} heads")

# write_kv: each token's keys and values to its cache slot: a packed prefill of two rows (one sequence) and
# a decode step (a token per row)
n_slots = 40
for Hkv, slots in itertools.product((3, 2), (torch.tensor([[12, 13, 14, 3, 4]]), torch.tensor([[3], [21], [0], [39]]))):
    kc, vc = torch.randn(Hkv, n_slots, D, dtype=h), torch.randn(Hkv, n_slots, D, dtype=h)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    B, L = slots.shape
    key = torch.randn(B, L, Hkv, D, dtype=h).transpose(1, 2)  # the projections' transposed layout
    value = torch.randn(B, L, Hkv, D, dtype=h).transpose(1, 2)
    ik.write_kv(kc, vc, key, value, slots)
    for b, l in itertools.product(range(B), range(L)):
        kc_ref[:, slots[b, l]] = key[b, :, l]
        vc_ref[:, slots[b, l]] = value[b, :, l]
    same(kc, kc_ref, f"write_kv keys, {Hkv} heads, {B} x {L} tokens")
    same(vc, vc_ref, f"write_kv values, {Hkv} heads, {B} x {L} tokens")


# the rope's bf16 rounding on the bits (the GPU path; the interpreter's fp16 takes the cast): as torch rounds
@triton.jit
def _round_bf16_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, ik._rounded(tl.load(x_ptr + offs), tl.bfloat16))


x = torch.cat([torch.randn(4000, dtype=torch.float32) * 10.0 ** torch.randint(-3, 4, (4000,)).float(),
               torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 0.0, -0.0] + [1.0] * 91)])  # ties
y = torch.empty_like(x)
_round_bf16_kernel[(1,)](x, y, N=x.numel())
same(y, x.to(torch.bfloat16).float(), "bf16 rounding on the bits")

# rms_norm
x, weight = torch.randn(9, 48, dtype=h), torch.rand(48, dtype=h) + 0.5
y = ik.rms_norm(x, weight, 1e-6)
ref = weight.float() * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(h).float()
assert (y.float() - ref).abs().max() < TOL
same(ik.rms_norm(x[4:5], weight, 1e-6), y[4:5], "rms_norm one row")

# prefill attention: three rows packed into one sequence, their runs of cache slots in another order and
# with room left after each, against each row alone at the start of a cache of another size
B, H, Hkv, D, lengths = 3, 4, 2, 32, [5, 70, 19]
first_slots = [150, 0, 100]  # row 0 last, room after each
starts = [sum(lengths[:i]) for i in range(B)]
segments = list(zip(first_slots, starts, lengths))
q = torch.randn(1, sum(lengths), H, D, dtype=h).transpose(1, 2)  # transformers' layout: (1, H, T, D), not contiguous
k, v = torch.randn(Hkv, 160, D, dtype=h), torch.randn(Hkv, 160, D, dtype=h)
out = ik.prefill_attention(q, k, v, ik.prefill_blocks(segments, q.device), D ** -0.5)
ref = reference_prefill_attention(q, k, v, segments, D ** -0.5)
assert (out.float() - ref.float()).abs().max() < TOL
for slot, first, n in segments:
    alone = ik.prefill_attention(q[:, :, first:first + n], k[:, slot:slot + n + 7].contiguous(),
                                 v[:, slot:slot + n + 7].contiguous(), ik.prefill_blocks([(0, 0, n)], q.device),
                                 D ** -0.5)
    same(alone[0], out[0, first:first + n], f"prefill row at slot {slot}")

# decode: one query per row at its own position, its keys from its first slot
pos, first = torch.tensor([4, 69, 18]), torch.tensor(first_slots)
q1 = torch.randn(B, 1, H, D, dtype=h).transpose(1, 2)
out = ik.decode_attention(q1, k, v, first, pos, D ** -0.5)
ref = reference_attention(q1, k, v, first, pos, D ** -0.5)
assert (out.float() - ref.float()).abs().max() < TOL
zero = torch.zeros(1, dtype=torch.long)
for b in range(B):
    n, slot = int(pos[b]) + 1, first_slots[b]
    alone = ik.decode_attention(q1[b:b + 1], k[:, slot:slot + n].contiguous(), v[:, slot:slot + n].contiguous(),
                                zero, pos[b:b + 1], D ** -0.5)
    same(alone[0], out[b], f"decode row {b}")

# the whole loop on the kernels, through batch_invariant's wiring (q/k/v and gate/up groups, silu_mul, rope,
# write_kv, attention, norms, lm_head): a tiny Llama's greedy tokens, each row the same alone as in a batch
from transformers import LlamaForCausalLM  # noqa: E402

from loraflow import batch_invariant as bi  # noqa: E402
from loraflow.generation import generate_ids_batch_invariant  # noqa: E402

if interpreted:  # the interpreter runs the kernels on CPU tensors
    bi._on_kernels = lambda x: x.dtype in (torch.bfloat16, torch.float16)
launches, entry_points = {}, ("write_kv", "rope", "silu_mul", "matmul_group", "prefill_attention", "decode_attention",
                               "rms_norm")
for name in entry_points:
    def counted(*args, _f=getattr(ik, name), _name=name, **kwargs):
        launches[_name] = launches.get(_name, 0) + 1
        return _f(*args, **kwargs)
    setattr(ik, name, counted)
torch.manual_seed(1)
model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)).eval()
prompts = [[5, 9, 3], [7] * 11, [2, 4, 6, 8, 10, 12]]
kw = dict(pad_id=0, stop_ids=[], max_new_tokens=4, cuda_graph=False)
in_float32 = generate_ids_batch_invariant(model, prompts, batch_size=3, **kw)  # PyTorch ops, no kernel
assert not launches, launches
model = model.to(h)
batched = generate_ids_batch_invariant(model, prompts, batch_size=3, **kw)
if interpreted:  # fp16's 11 bits keep this model's greedy choices; bf16's 8 may flip a near tie
    assert batched == in_float32, f"generation on the kernels: {batched}, in float32 PyTorch: {in_float32}"
assert set(launches) == set(entry_points), launches
for i, p in enumerate(prompts):
    alone = generate_ids_batch_invariant(model, [p], batch_size=1, **kw)
    assert alone == [batched[i]], f"generation row {i}: {alone} alone, {batched[i]} in the batch"
print("OK", h, torch.get_default_device())
