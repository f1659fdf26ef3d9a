"""bitsandbytes' 8-bit AdamW, updated a run of parameters per kernel launch instead of one parameter.

Why: bitsandbytes' Optimizer8bit.step (0.50) launches one update per parameter and then calls
torch.cuda.synchronize() after each. A LoRA adapter on the 7 projections of an 8B model has 448
tensors, so every optimizer step made 448 host round trips with the GPU idle between them: 47 ms of
QLoRA T3's 1.69 s step (benchmarks/results/train-h200-unsloth.md, run 19 profile).

The update is blockwise: blocks of 256 values (BLOCK), each quantized against its own absmax, and no
value reads another block. So the update of a concatenation equals the concatenation of the updates
wherever every tensor starts on a block boundary: the same bytes, not an approximation
(tests/test_flat_adamw8bit.py compares every state and weight with bitsandbytes' own class).

Each param group's 8-bit eligible tensors (8-bit states, a multiple of BLOCK values, contiguous, no
per-parameter override) keep their states in one flat buffer per state; the per-parameter state
entries are views into it, in bitsandbytes' layout, so a checkpoint loads into either class. A step
copies a chunk of parameters and gradients into a staging pair (CHUNK_VALUES each, fp32: 32 MiB
together), runs one update over it and copies the parameters back. The staging lives only inside
the optimizer step, after backward has freed its activations; the memory plan counts it there
(memplan.estimate.optimizer_step_bytes). Every other tensor
(32-bit states below min_8bit_size, odd sizes, overrides) takes bitsandbytes' own update, without the
synchronize. Paged optimizers keep bitsandbytes' step unchanged: their copies need its syncs.
"""
from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

from loraflow.memplan.estimate import FLAT_8BIT_STAGING_VALUES as CHUNK_VALUES  # the plan counts them

BLOCK = 256  # bitsandbytes' blockwise optimizer block (Optimizer2State.init_state)


class FlatAdamW8bit(bnb.optim.AdamW):
    """bnb.optim.AdamW with optim_bits=8 and the same arguments; see the module's docstring."""

    def __init__(self, params, **kwargs):
        kwargs["optim_bits"] = 8
        super().__init__(params, **kwargs)
        self._layouts: dict[int, _FlatStates] = {}

    @torch.no_grad()
    def step(self, closure=None):
        if self.is_paged:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:  # as bitsandbytes' step does before its first update
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            flat = []
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
                if self._flattens(gindex, pindex, p):
                    if not flat:  # no override names it: the group's config, as for every flat one
                        config = self.get_config(gindex, pindex, group)
                    flat.append(p)
                else:
                    self.update_step(group, p, gindex, pindex)
            if flat:
                self._update_flat(gindex, flat, config)
        return loss

    def _flattens(self, gindex, pindex, p) -> bool:
        overridden = (gindex, pindex) in self.mng.index2config or id(p) in self.mng.pid2config
        return (not overridden and self.state[p]["state1"].dtype == torch.uint8 and p.numel() % BLOCK == 0
                and p.is_contiguous() and p.grad.is_contiguous() and p.grad.dtype == p.dtype)

    def _update_flat(self, gindex: int, params: list[torch.Tensor], config: dict) -> None:
        layout = self._layouts.get(gindex)
        # a loaded checkpoint's states, or a tensor's first state, are tensors of their own: gather them
        if layout is None or not layout.covers(params, self.state):
            layout = self._layouts[gindex] = _FlatStates(params, self.state)
        for chunk in layout.chunks(params, self.state):
            self._update_chunk(chunk, layout, config)

    def _update_chunk(self, chunk: list[torch.Tensor], layout: "_FlatStates", config: dict) -> None:
        first, state = chunk[0], self.state[chunk[0]]
        start, end = layout.offset[first], layout.offset[chunk[-1]] + chunk[-1].numel()
        if len(chunk) == 1:
            values, grads = first.view(-1), first.grad.view(-1)
        else:
            values = torch.cat([p.view(-1) for p in chunk])
            grads = torch.cat([p.grad.view(-1) for p in chunk])
        step = state["step"] + 1
        betas = config["betas"]
        F.optimizer_update_8bit_blockwise(
            self.optimizer_name, grads, values, layout.state1[start:end], layout.state2[start:end],
            betas[0], betas[1], betas[2] if len(betas) >= 3 else 0.0, config["alpha"], config["eps"],
            step, config["lr"], state["qmap1"], state["qmap2"],
            layout.absmax1[start // BLOCK:end // BLOCK], layout.absmax2[start // BLOCK:end // BLOCK],
            config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"])
        if len(chunk) > 1:
            torch._foreach_copy_([p.view(-1) for p in chunk], list(values.split([p.numel() for p in chunk])))
        for p in chunk:
            self.state[p]["step"] = step


class _FlatStates:
    """One group's 8-bit states in four flat buffers, every parameter at a BLOCK-aligned offset
    (its size is a multiple of BLOCK), and the per-parameter state entries made views into them."""

    def __init__(self, params: list[torch.Tensor], state) -> None:
        self.offset: dict[torch.Tensor, int] = {}
        total = 0
        for p in params:
            self.offset[p] = total
            total += p.numel()
        device = params[0].device
        self.state1 = torch.empty(total, dtype=torch.uint8, device=device)
        self.state2 = torch.empty(total, dtype=torch.uint8, device=device)
        self.absmax1 = torch.empty(total // BLOCK, dtype=torch.float32, device=device)
        self.absmax2 = torch.empty(total // BLOCK, dtype=torch.float32, device=device)
        for p in params:
            s, start, n = state[p], self.offset[p], p.numel()
            for name, flat, lo, hi in (("state1", self.state1, start, start + n),
                                       ("state2", self.state2, start, start + n),
                                       ("absmax1", self.absmax1, start // BLOCK, (start + n) // BLOCK),
                                       ("absmax2", self.absmax2, start // BLOCK, (start + n) // BLOCK)):
                view = flat[lo:hi].view(s[name].shape)
                view.copy_(s[name])
                s[name] = view

    def covers(self, params: list[torch.Tensor], state) -> bool:
        return all(p in self.offset and state[p]["state1"].data_ptr()
                   == self.state1.data_ptr() + self.offset[p] for p in params)

    def chunks(self, params: list[torch.Tensor], state):
        """Runs of parameters adjacent in the buffers and at the same step count (one launch takes
        one step), cut where the staging would pass CHUNK_VALUES."""
        run: list[torch.Tensor] = []
        for p in params:
            if run:
                last = run[-1]
                adjacent = self.offset[last] + last.numel() == self.offset[p]
                same = state[last]["step"] == state[p]["step"] and last.dtype == p.dtype
                full = self.offset[p] + p.numel() - self.offset[run[0]] > CHUNK_VALUES
                if not (adjacent and same) or full:
                    yield run
                    run = []
            run.append(p)
        if run:
            yield run


def trainer_optimizer(args, model):
    """The Trainer's optimizer_cls_and_kwargs for optim adamw_bnb_8bit in one process: this class with
    the arguments the Trainer would give bitsandbytes' AdamW. None elsewhere (sharded parameters keep
    bitsandbytes' class). The Trainer's own rule for that class, 32-bit states for nn.Embedding
    weights, is keyed on the class's package name, so it is registered here."""
    if args.optim != "adamw_bnb_8bit" or args.world_size > 1:
        return None
    from transformers import Trainer
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return FlatAdamW8bit, kwargs
