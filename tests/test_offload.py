"""Offloaded checkpoints (loraflow/offload.py): a layer that keeps only a copy of its input, away from
the tensor the forward used, and recomputes in backward, gives the loss and LoRA gradients of the
plain model and of torch's own checkpointing, on the tiny model (CPU; the copy streams are exercised
by benchmarks/train_bench.sh on a GPU)."""
import pytest
import torch

from loraflow import fastpath, offload
from tests.test_packing import ROWS, lora_model, loss_and_grads


@pytest.mark.parametrize("layers", [1, 2])
def test_offloaded_checkpoints_give_the_plain_loss_and_gradients(tiny_model_dir, layers):
    batch = fastpath.packed_collator(0)(ROWS)
    plain = lora_model(tiny_model_dir, fastpath.register_packed_attention())
    loss_a, grads_a = loss_and_grads(plain, batch)
    offloaded = lora_model(tiny_model_dir, fastpath.register_packed_attention())
    assert fastpath.checkpoint_layers(offloaded, layers, offload=True) == layers
    stored = []
    original = offload.Offloader.store
    offload.Offloader.store = lambda self, i, t: stored.append(i) or original(self, i, t)
    try:
        loss_b, grads_b = loss_and_grads(offloaded, batch)
    finally:
        offload.Offloader.store = original
    assert stored == list(range(layers))  # each checkpointed layer's input went to the offloader once
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_offloader_keeps_a_copy_and_gives_it_back_once():
    keeper = offload.Offloader()
    t = torch.arange(6.0).reshape(2, 3)
    keeper.store(0, t)
    keeper.store(1, t * 2)
    t.add_(100)  # the forward's tensor may be reused: the stash is a copy
    assert torch.equal(keeper.take(1), torch.arange(6.0).reshape(2, 3) * 2)
    assert torch.equal(keeper.take(0), torch.arange(6.0).reshape(2, 3))
    assert keeper.stashes == {}


def test_a_second_input_that_needs_a_gradient_is_refused():
    keeper = offload.Offloader()
    x, y = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="offload_checkpoints"):
        keeper.checkpoint_function(0)(lambda a, b: a * b, x, y)
