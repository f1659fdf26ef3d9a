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


def test_stashed_up_outputs_skip_the_projection_in_the_recompute_and_change_no_gradient(tiny_model_dir, monkeypatch):
    """Fused LoRA projections, both layers checkpointed and offloaded, one of them stashing its up
    projection's output: gradients bit for bit those of plain offloaded recomputation, and in the stashing layer
    up_proj's base weight serves the forward and the backward only (the recompute took the stash)."""
    from loraflow import fused_lora
    batch = fastpath.packed_collator(0)(ROWS)
    runs = []
    for stashed in (0, 1):
        model = lora_model(tiny_model_dir, fastpath.register_packed_attention())
        fused_lora.fuse_lora_projections(model)
        fastpath.checkpoint_layers(model, 2, offload=True, stashed_outputs=stashed)
        uses = _base_weight_uses(model, monkeypatch, "mlp.up_proj")
        runs.append((loss_and_grads(model, batch), uses()))
        monkeypatch.undo()
    (plain, plain_uses), (stashed_run, stashed_uses) = runs
    assert plain_uses == [3, 3]  # forward, recompute, backward
    assert stashed_uses == [3, 2]  # one of two spread over the layers is the second; the first recomputes
    assert stashed_run[0] == plain[0]
    for name in plain[1]:
        assert torch.equal(stashed_run[1][name], plain[1][name]), name


def test_a_stashed_output_is_copied_away_and_handed_back_once():
    """Outside an offloaded layer nothing is stashed; in its forward the stashing layer's up_proj output
    goes to the offloader (a copy), other projections and other layers' do not; its recompute takes
    the stash instead of computing, once; a layer whose stash is missing computes."""
    keeper = offload.Offloader({0})
    y = torch.arange(4.0)
    assert offload.projection_output("up_proj", lambda: y) is y and keeper.outputs == {}
    with keeper.running(0, "record"):
        assert offload.projection_output("up_proj", lambda: y) is y
        assert offload.projection_output("gate_proj", lambda: y * 2) is not None
    with keeper.running(1, "record"):
        offload.projection_output("up_proj", lambda: y * 3)
    assert list(keeper.outputs) == [0] and list(keeper.outputs[0]) == ["up_proj"]
    y.add_(100)  # the stash is a copy
    with keeper.running(0, "replay"):
        assert torch.equal(offload.projection_output("up_proj", lambda: None), torch.arange(4.0))
        assert torch.equal(offload.projection_output("up_proj", lambda: torch.zeros(4)), torch.zeros(4))
    assert keeper.outputs == {0: {}}


def test_take_fetches_the_layers_own_copies_before_the_next_ones(monkeypatch):
    """One copy stream serves all: layer i's input and stashed output must be queued before layer i-1's,
    or the recompute of layer i waits for both layers' copies."""
    keeper = offload.Offloader({0, 1})
    for i in (0, 1):
        with keeper.running(i, "record"):
            offload.projection_output("up_proj", lambda: torch.full((3,), float(i)))
        keeper.store(i, torch.full((2,), float(i)))
    names = {id(keeper.stashes[i]): f"input {i}" for i in (0, 1)}
    names.update({id(keeper.outputs[i]["up_proj"]): f"up {i}" for i in (0, 1)})
    fetched = []
    original = offload._Stash.fetch
    monkeypatch.setattr(offload._Stash, "fetch", lambda self: fetched.append(names[id(self)]) or original(self))
    assert torch.equal(keeper.take(1), torch.full((2,), 1.0))
    assert fetched[:2] == ["input 1", "up 1"] and fetched[2:] == ["input 0", "up 0"], fetched


def test_backward_fetches_the_first_recomputed_layer_while_the_kept_layers_run(tiny_model_dir, monkeypatch):
    """With the last layer kept, the first offloaded layer's copies start when backward begins (the
    gradient of the last layer's output), before the kept layer's LoRA gradients, not at its own turn."""
    batch = fastpath.packed_collator(0)(ROWS)
    model = lora_model(tiny_model_dir, fastpath.register_packed_attention())
    assert fastpath.checkpoint_layers(model, 1, offload=True) == 1
    events = []
    for prefetch_or_take in ("prefetch", "take"):
        original = getattr(offload.Offloader, prefetch_or_take)
        monkeypatch.setattr(offload.Offloader, prefetch_or_take,
                            lambda self, i, _o=original, _n=prefetch_or_take: events.append((_n, i)) or _o(self, i))
    kept = [p for n, p in model.named_parameters() if ".layers.1." in n and "lora_B" in n][0]
    kept.register_hook(lambda grad: events.append(("kept layer's gradient", 1)))
    loss_and_grads(model, batch)
    first = events.index(("prefetch", 0))
    assert first < events.index(("kept layer's gradient", 1)) < events.index(("take", 0)), events


def _base_weight_uses(model, monkeypatch, suffix):
    """Counts, per layer, how often the base weight of the projections named `suffix` is taken."""
    from loraflow import fused_lora
    bases = [m.get_base_layer() for n, m in model.named_modules() if n.endswith(suffix)]
    uses = {id(b): 0 for b in bases}
    original = fused_lora.base_weight

    def counting(base, dtype):
        if id(base) in uses:
            uses[id(base)] += 1
        return original(base, dtype)
    monkeypatch.setattr(fused_lora, "base_weight", counting)
    return lambda: [uses[id(b)] for b in bases]


def test_a_recompute_leaves_out_the_projection_whose_output_backward_never_reads(tiny_model_dir, monkeypatch):
    """In a Llama layer down_proj's output only joins the residual sum: the first recompute finds that in
    its graph, and the later ones skip the projection (its base weight serves forward and backward only),
    with gradients bit for bit those of recomputing it."""
    from loraflow import fused_lora
    batch = fastpath.packed_collator(0)(ROWS)
    runs = []
    for learn in (offload.unread_outputs, lambda outputs: set()):
        model = lora_model(tiny_model_dir, fastpath.register_packed_attention())
        fused_lora.fuse_lora_projections(model)
        fastpath.checkpoint_layers(model, 2, offload=True)
        monkeypatch.setattr(offload, "unread_outputs", learn)
        loss_and_grads(model, batch)  # the first recompute of each layer computes everything
        uses = _base_weight_uses(model, monkeypatch, "mlp.down_proj")
        runs.append((model.loraflow_offloader.unread, loss_and_grads(model, batch), uses()))
        monkeypatch.undo()
    (unread, skipped, skipped_uses), (nothing, computed, computed_uses) = runs
    assert unread == {0: {"down_proj"}, 1: {"down_proj"}} and nothing == {0: set(), 1: set()}
    assert computed_uses == [3, 3] and skipped_uses == [2, 2]  # forward, recompute, backward
    assert skipped[0] == computed[0]
    for name in computed[1]:
        assert torch.equal(skipped[1][name], computed[1][name]), name


def test_an_output_a_norm_reads_is_recomputed(tmp_path):
    """Gemma 2 normalizes the attention's and the MLP's outputs before the residual sum: the norm keeps
    its input, so no projection's output is left out of the recompute."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from loraflow import fused_lora
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    fused_lora.fuse_lora_projections(model)
    fastpath.checkpoint_layers(model, 2, offload=True)
    model.train()
    ids = torch.randint(0, 64, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.loraflow_offloader.unread == {0: set(), 1: set()}
