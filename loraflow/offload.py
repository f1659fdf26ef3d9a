"""Checkpointed layers whose saved input waits in CPU memory instead of GPU memory.

A checkpointed decoder layer keeps only its input hidden state (tokens x hidden, 8 KB a token at 8B
in bf16) and recomputes the rest in backward; over 32 layers that is 1 GiB per 4,096 tokens, the
largest share of a QLoRA step's activations. Here that input is copied to pinned CPU memory while
the layer computes (on a copy stream, so the copy overlaps the compute), and copied back in
backward one layer ahead: while layer i recomputes and runs its backward, layer i-1's input is on
its way. The GPU keeps at most two layer inputs at a time, which lets the plan fit a larger
micro-batch in the same budget (fewer launches per token, the bound of a QLoRA step). Unsloth
offloads the same way; the recompute and the math are those of torch's checkpoint, so the loss
and gradients are unchanged (tests/test_offload.py).

Stashed outputs: the MLP's up projection output of some of those layers goes to CPU memory too, and
the recompute takes it from there instead of running the projection again (with the same input the
recompute would compute the same values, so gradients are bit for bit those of plain recomputation).
The PCIe link does each way about 50 GB/s beside GEMMs that keep their rate (H100, run 16,
benchmarks/host_copy_probe.py), while recomputing makes a layer's activations about 3x faster; so the
link only pays where it would idle. The memory plan (memplan.stashed_output_layers) picks how many
layers stash, as many as the forward pass's copies keep pace with, spread over the checkpointed ones.
One output a layer: up_proj's (gate_proj's is as large; the link has no room for both), intermediate
width, a quarter of the layer's projection FLOPs at 8B.

Unread outputs: a projection whose output no backward node reads (in a Llama, Qwen or Mistral layer
down_proj's, which only joins the residual sum) is left uncomputed in the recompute: an empty tensor
stands in for it. Each layer's first recompute computes everything and looks at its autograd graph
(unread_outputs); a layer that normalizes that output (Gemma 2 and 3) keeps computing it. The values
never reach a gradient, so gradients are bit for bit those of the full recompute; at 8B the down_proj
GEMM is a seventh of a layer's projection FLOPs.

The layer runs as a reentrant checkpoint (one autograd node whose backward recomputes the layer and
backpropagates through it), so the input hidden state must be the layer's only input that needs
a gradient: true of the decoder layers transformers calls with the hidden state as the positional
argument. A layer given another such tensor is refused, not silently given no gradient.
"""
from __future__ import annotations

import contextlib

import torch

# projections whose output a stashing layer keeps in CPU memory (fused_lora asks by module name)
STASHED_PROJECTIONS = frozenset({"up_proj"})
# the offloaded layer running now and how: (offloader, layer index, "record" | "replay"), or None
_running: list = [None]


def projection_output(name: str, compute, empty=None):
    """The output of projection `name` of the layer running now: compute()'d, and stashed if the layer
    is an offloaded one that stashes it (its forward); in its recompute, the stashed copy where it is
    there, or empty() (no values) where the layer's backward never reads it (Offloader.unread); plain
    compute() everywhere else."""
    if _running[0] is None:
        return compute()
    offloader, index, mode = _running[0]
    if mode == "replay":
        stash = offloader.outputs.get(index, {}).pop(name, None)
        if stash is not None:
            return stash.take()
        if empty is not None and name in offloader.unread.get(index, ()):
            return empty()
        return compute()
    y = compute()
    if index in offloader.stash_output_layers and name in STASHED_PROJECTIONS:
        offloader.outputs.setdefault(index, {})[name] = _Stash(y, offloader.stream(y.device))
    return y


def _saves_a_tensor(node) -> bool:
    """Whether an autograd node keeps a tensor for its backward (a custom Function's always counts)."""
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        return True
    for attr in dir(node):
        if attr.startswith("_saved_"):
            try:
                value = getattr(node, attr)
            except RuntimeError:  # a tensor already freed: it was kept, whatever it was
                return True
            if isinstance(value, torch.Tensor) or (
                    isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)):
                return True
    return False


def unread_outputs(outputs) -> set[str]:
    """The projections (one-member fused LoRA groups, by module name) whose output no backward node of
    this graph reads: every path from `outputs` down to the projection's node passes only nodes that
    keep no tensor (the residual add, views, casts). Their values never matter to the gradients, so a
    recompute need not compute them: in a Llama, Qwen or Mistral layer, down_proj's output only joins
    the residual sum, while one with a norm after the MLP (Gemma 2 and 3) reads it."""
    clean, read = set(), set()
    stack = [(o.grad_fn, False) for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen = set()
    while stack:
        node, tainted = stack.pop()
        if node is None or (id(node), tainted) in seen:
            continue
        seen.add((id(node), tainted))
        names = getattr(node, "names", None)
        if names is not None:  # a fused LoRA group's node (fused_lora._LoraGroup)
            if len(names) == 1:
                (read if tainted else clean).add(names[0])
            below = True  # past it, tensors feed the projection's input, which it keeps
        else:
            below = tainted or _saves_a_tensor(node)
        stack.extend((child, below) for child, _ in node.next_functions)
    return clean - read


class _Stash:
    """One tensor (a layer's input or a stashed output): in pinned CPU memory after forward, back on its
    device on request."""

    def __init__(self, tensor: torch.Tensor, stream):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.stream, self.back, self.arrived = stream, None, None
        if stream is None:  # CPU: a copy, so that nothing is held by reference (tests)
            self.host = tensor.detach().clone()
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written by then
        with torch.cuda.stream(stream):
            self.host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it

    def fetch(self) -> None:
        """Start the copy back (on the copy stream, behind everything queued on the compute stream)."""
        if self.back is not None or self.stream is None:
            return
        self.back = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.back.copy_(self.host, non_blocking=True)
            self.arrived = self.stream.record_event()
        self.back.record_stream(self.stream)

    def take(self) -> torch.Tensor:
        if self.stream is None:
            return self.host.clone()
        self.fetch()
        torch.cuda.current_stream(self.device).wait_event(self.arrived)
        back, self.back, self.host = self.back, None, None
        return back


class Offloader:
    """The offloaded inputs (and stashed outputs) of one model's checkpointed layers, by layer index:
    forward stores layer i's, backward takes them and starts fetching layer i-1's."""

    def __init__(self, stash_output_layers=frozenset()):
        self.stashes: dict[int, _Stash] = {}
        self.outputs: dict[int, dict[str, _Stash]] = {}  # stashed projection outputs, by layer and name
        self.stash_output_layers = frozenset(stash_output_layers)
        # by layer index, learned in its first recompute: the projections whose output its backward never
        # reads (unread_outputs), which its later recomputes leave uncomputed
        self.unread: dict[int, set[str]] = {}
        self._stream = None

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def store(self, index: int, tensor: torch.Tensor) -> None:
        self.stashes[index] = _Stash(tensor, self.stream(tensor.device))

    def prefetch(self, index: int) -> None:
        """Start layer `index`'s input and stashed outputs on their way back."""
        for s in (self.stashes.get(index), *self.outputs.get(index, {}).values()):
            if s is not None:
                s.fetch()

    def take(self, index: int) -> torch.Tensor:
        """Layer `index`'s input; its stashed outputs and layer index-1's start their way back, in that
        order (one copy stream: the recompute waits for this layer's copies, not for index-1's)."""
        self.prefetch(index)
        stash = self.stashes.pop(index)
        self.prefetch(index - 1)  # its copies overlap this layer's recompute and backward
        return stash.take()

    def prefetch_when_backward_reaches(self, output: torch.Tensor, index: int) -> None:
        """Fetch layer `index`'s stashes as soon as the gradient of `output` is computed. Given the last
        decoder layer's output, that is the start of backward: the kept layers' backward then hides the
        copies that the first recompute would otherwise wait for (on an H100, 22 ms of idle GPU a step
        at 8B; benchmarks/results/train-h200-unsloth.md, run 19). The plan's working set for the kept
        layers' phase already holds a fetched-ahead input and up output."""
        if output.requires_grad:
            def start(grad):
                self.prefetch(index)
            output.register_hook(start)

    @contextlib.contextmanager
    def running(self, index: int, mode: str):
        """Layer `index` runs its forward ("record") or its recompute ("replay")."""
        before, _running[0] = _running[0], (self, index, mode)
        try:
            yield
        finally:
            _running[0] = before

    def checkpoint_function(self, index: int):
        """A stand-in for transformers' _gradient_checkpointing_func(function, *args) of layer `index`."""
        def checkpoint(function, hidden, *args):
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
                    isinstance(v, torch.Tensor) and v.requires_grad for v in getattr(function, "keywords", {}).values()):
                raise ValueError("offloaded checkpointing: the layer has an input besides the hidden state that "
                                 "needs a gradient; use train.offload_checkpoints: false for this model")
            return _OffloadedLayer.apply(function, self, index, hidden, *args)
        return checkpoint


def _autocast_state(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return {"device_type": device_type, "dtype": torch.get_autocast_dtype(device_type), "enabled": True}
    return {"device_type": device_type, "enabled": False}


class _OffloadedLayer(torch.autograd.Function):
    """Forward without keeping anything but the offloaded input; backward fetches it, recomputes the
    layer under the forward's autocast state, and backpropagates through the recomputation."""

    @staticmethod
    def forward(ctx, function, offloader, index, hidden, *args):
        ctx.function, ctx.offloader, ctx.index, ctx.args = function, offloader, index, args
        ctx.autocast = _autocast_state(hidden.device.type)
        with torch.no_grad(), offloader.running(index, "record"):
            out = function(hidden, *args)
        offloader.store(index, hidden)
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.offloader.take(ctx.index).requires_grad_(True)
        with torch.enable_grad(), torch.autocast(**ctx.autocast), ctx.offloader.running(ctx.index, "replay"):
            out = ctx.function(hidden, *ctx.args)
        ctx.offloader.outputs.pop(ctx.index, None)  # what the recompute did not ask for
        outs = out if isinstance(out, tuple) else (out,)
        if ctx.index not in ctx.offloader.unread:  # the first recompute computed everything; look at its graph
            ctx.offloader.unread[ctx.index] = unread_outputs(outs)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, hidden.grad, *(None for _ in ctx.args))
