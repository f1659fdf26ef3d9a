"""LoRA projections as one autograd node per group of projections that read the same input.

peft computes y = base(x) + lora_B(lora_A(x)) * scale as five ops, and autograd then sums every
projection's share of grad_x as a separate full-size add: for one Llama layer, five adds for q/k/v,
three for gate/up, one each for o and down, plus a scale and an add per projection in forward and a
scale in backward. Each is a pass over a tokens x width tensor in memory, about 0.9 MB per token and
layer at 8B, a tenth of a LoRA step on an H200. Here:
- forward: one GEMM for the group's stacked A matrices (x is read once, not once per projection),
  then per projection the low-rank update (x A^T)(s B)^T, onto which the base GEMM accumulates in its
  own epilogue (addmm_, beta=1). The other order (base GEMM first, the update added after) is a
  rank-r GEMM that reads and writes the whole output once more: 1.6 GB a layer at 16k tokens;
- backward: grad_x is accumulated in one buffer by addmm_ (beta=1) over every base and LoRA term, so
  no grad tensor is summed afterwards; grad_A for the whole group is one GEMM.
It saves what peft saves (x and x A^T), and it computes the same function: tests/test_fused_lora.py
checks loss and gradients against peft on CPU.

The adapter's weights are fp32 (peft's default) and the matmuls run in the compute dtype, so every
use casts them, and q/k/v's A matrices are stacked: 42 casts and cats per layer and micro-batch
(forward, the checkpointed recompute, backward), a sixth of the launches of a host-bound QLoRA step.
Each group keeps its cast weights instead (one compute-dtype copy of the adapter, which the memory
plan counts) until an optimizer step or any in-place write changes them.

Groups: projections under one parent that take the same input (q/k/v, gate/up); whichever member
is called first computes the group and hands the others their outputs when they are called with
the same tensor. Any other call (another input, adapters disabled) computes alone, so a model that
uses its projections in another order is still right, only not grouped.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from loraflow import offload

# sibling projections that every supported architecture (Llama, Qwen, Mistral, Gemma, Phi-3's
# unfused forms) calls on one input tensor
SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight in the compute dtype: a plain Linear's as it is, a 4-bit one dequantized
    (never kept: dequantized again in backward)."""
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf
        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight.to(dtype)


def _project(flat, update, base, b_scaled, dtype):
    """x W^T + bias + update (s B)^T, the base GEMM accumulating onto the low-rank term."""
    y = update @ b_scaled.t() if base.bias is None else torch.addmm(base.bias.to(dtype), update, b_scaled.t())
    return y.addmm_(flat, base_weight(base, dtype).t())


# optimizer steps so far, in this process: a cast cache from before a step is stale even where the
# optimizer wrote the weights through .data or a raw pointer (bitsandbytes' 8-bit AdamW), which
# leaves the tensor's version counter as it was
_optimizer_steps = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_step)


class _CastWeights:
    """A group's adapter weights in the compute dtype: the A matrices stacked, each B scaled. Recast
    when an optimizer has stepped or a weight was written in place or replaced since the last cast."""

    def __init__(self):
        self.key, self.a_all, self.b_list = None, None, None

    def get(self, a_list, b_list, scales, dtype: torch.dtype):
        """The stacked A matrices and each B times its projection's scale, in `dtype`."""
        key = (dtype, _optimizer_steps[0], *scales, *((w._version, w.data_ptr()) for w in (*a_list, *b_list)))
        if key != self.key:
            self.a_all = torch.cat([a.detach().to(dtype) for a in a_list])
            self.b_list = [(b.detach() * s).to(dtype) for b, s in zip(b_list, scales)]
            self.key = key
        return self.a_all, self.b_list


class _LoraGroup(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T for every projection i of a group.
    Inputs: x, the bases, scales, the projections' module names and the group's _CastWeights (not
    differentiated), then every A, then every B. An offloaded checkpointed layer may hand a projection's
    output over from its forward to its recompute (offload.projection_output)."""

    @staticmethod
    def forward(ctx, x, bases, scales, names, cast, *lora):
        n = len(bases)
        a_list, b_list = lora[:n], lora[n:]
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        ranks = [a.shape[0] for a in a_list]
        a_all, b_scaled = cast.get(a_list, b_list, scales, dtype)
        xa = flat @ a_all.t()
        outputs, start = [], 0
        for base, b, r, name in zip(bases, b_scaled, ranks, names):
            update = xa[:, start:start + r]
            y = offload.projection_output(name, lambda: _project(flat, update, base, b, dtype),
                                          lambda: flat.new_empty(flat.shape[0], base.out_features))
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
            start += r
        ctx.save_for_backward(flat, xa, *lora)
        ctx.bases, ctx.scales, ctx.ranks, ctx.x_shape, ctx.cast = bases, scales, ranks, x.shape, cast
        ctx.names = names  # offload.unread_outputs finds the projections' nodes by them
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        flat, xa, *lora = ctx.saved_tensors
        n = len(ctx.bases)
        a_list, b_list = lora[:n], lora[n:]
        dtype = flat.dtype
        a_all, b_scaled = ctx.cast.get(a_list, b_list, ctx.scales, dtype)
        # the first layer's q/k/v read the frozen embedding's output (no checkpointing): no one needs
        # grad_x there, so neither the base GEMMs nor the 4-bit dequantization for it run
        need_x = ctx.needs_input_grad[0]
        grad_x, dy_b, grad_b, start = None, [], [], 0
        for base, b, bs, s, r, grad_y in zip(ctx.bases, b_list, b_scaled, ctx.scales, ctx.ranks, grads):
            if grad_y is None:  # an output that did not reach the loss
                dy_b.append(flat.new_zeros(flat.shape[0], r))
                grad_b.append(None)
                start += r
                continue
            dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            if need_x:
                weight = base_weight(base, dtype)
                grad_x = dy @ weight if grad_x is None else grad_x.addmm_(dy, weight)
            dy_b.append(dy @ bs)  # the scale is in bs
            grad_b.append(((dy.t() @ xa[:, start:start + r]) * s).to(b.dtype))
            start += r
        dy_b_all = torch.cat(dy_b, dim=1)
        if need_x:
            grad_x = dy_b_all @ a_all if grad_x is None else grad_x.addmm_(dy_b_all, a_all)
            grad_x = grad_x.view(ctx.x_shape)
        grad_a_all = dy_b_all.t() @ flat
        grad_a = [g.to(a.dtype) for g, a in zip(grad_a_all.split(ctx.ranks), a_list)]
        return (grad_x, None, None, None, None, *grad_a, *grad_b)


class _Group:
    """Projections that share an input. The first member called with a tensor computes every member's
    output; the others take theirs when they are called with that same tensor."""

    def __init__(self, members: list, names: list[str]):
        self.members, self.names = members, tuple(names)
        self.input, self.pending = None, {}
        self.cast = _CastWeights()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.input is x and index in self.pending:
            y = self.pending.pop(index)
            if not self.pending:
                self.input = None
            return y
        outputs = _LoraGroup.apply(x, tuple(m.get_base_layer() for m in self.members),
                                   tuple(m.scaling["default"] for m in self.members), self.names, self.cast,
                                   *(m.lora_A["default"].weight for m in self.members),
                                   *(m.lora_B["default"].weight for m in self.members))
        self.pending = {i: y for i, y in enumerate(outputs) if i != index}
        self.input = x if self.pending else None
        return outputs[index]


def fusable(module) -> bool:
    """A plain LoRA projection (one adapter, no dropout, no DoRA or other variant, no LoRA bias, not
    merged) on a Linear or a 4-bit base. An 8-bit base keeps peft's path: its int8 matmul is another
    function."""
    from peft.tuners.lora import LoraLayer
    if not isinstance(module, LoraLayer) or list(module.lora_A) != ["default"] or module.lora_variant or module.merged:
        return False
    if not isinstance(module.lora_dropout["default"], torch.nn.Identity) or module.lora_B["default"].bias is not None:
        return False
    base = module.get_base_layer()
    if type(base) is torch.nn.Linear:
        return True
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    return isinstance(base, Linear4bit)


def fuse_lora_projections(model) -> int:
    """Route every fusable LoRA projection through _LoraGroup, grouped with its shared-input siblings.
    peft's modules and weights stay as they are, so saving, merging and disabling adapters do not
    change. Returns how many projections were fused."""
    fused = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        taken = set()
        for names in SHARED_INPUT:
            present = [n for n in sorted(names) if n in children and fusable(children[n])]
            if present:
                _install(_Group([children[n] for n in present], present))
                taken.update(id(children[n]) for n in present)
        for name, m in children.items():
            if id(m) not in taken and fusable(m):
                _install(_Group([m], [name]))
                taken.add(id(m))
        fused += len(taken)
    return fused


def _install(group: _Group) -> None:
    for index, m in enumerate(group.members):
        m.forward = _forward(group, index, m)
        m.loraflow_group = group


def _forward(group: _Group, index: int, module):
    base = module.get_base_layer()

    def forward(x, *args, **kwargs):
        if module.disable_adapters:
            return base(x)
        return group.output(index, x)
    return forward
