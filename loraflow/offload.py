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

The layer runs as a reentrant checkpoint (one autograd node whose backward recomputes the layer and
backpropagates through it), so the input hidden state must be the layer's only input that needs
a gradient: true of the decoder layers transformers calls with the hidden state as the positional
argument. A layer given another such tensor is refused, not silently given no gradient.
"""
from __future__ import annotations

import torch


class _Stash:
    """One layer input: in pinned CPU memory after forward, back on its device on request."""

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
    """The offloaded inputs of one model's checkpointed layers, by layer index: forward stores layer
    i's, backward takes it and starts fetching layer i-1's."""

    def __init__(self):
        self.stashes: dict[int, _Stash] = {}
        self._stream = None

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def store(self, index: int, tensor: torch.Tensor) -> None:
        self.stashes[index] = _Stash(tensor, self.stream(tensor.device))

    def take(self, index: int) -> torch.Tensor:
        stash = self.stashes.pop(index)
        stash.fetch()
        below = self.stashes.get(index - 1)
        if below is not None:
            below.fetch()  # overlaps this layer's recompute and backward
        return stash.take()

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
        with torch.no_grad():
            out = function(hidden, *args)
        offloader.store(index, hidden)
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.offloader.take(ctx.index).requires_grad_(True)
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            out = ctx.function(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, hidden.grad, *(None for _ in ctx.args))
