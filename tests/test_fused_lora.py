"""The fused LoRA projections (loraflow/fused_lora.py) compute what peft computes: the same loss, LoRA
gradients and input gradient, on tiny Llama and Qwen2 models (Qwen2's q/k/v carry biases), on a plain
and on a real nf4 base (bitsandbytes quantizes on CPU too), with checkpointing, with adapters
disabled, and over a short training run."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loraflow import fused_lora

SHAPE = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def wrapped(base):
    # init_lora_weights=False: B is random too, so the LoRA term is not zero and its gradients all flow
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def loss_and_grads(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, embeds.grad.clone()


def assert_same_function(plain, fused, ids, rtol=1e-4, atol=1e-6):
    (loss_p, grads_p, dx_p), (loss_f, grads_f, dx_f) = loss_and_grads(plain, ids), loss_and_grads(fused, ids)
    assert len(grads_p) == 2 * 2 * 7 and grads_p.keys() == grads_f.keys()  # lora_A and lora_B of 14 projections
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_f, dx_p, rtol=rtol, atol=atol)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_f[name], g, rtol=rtol, atol=atol, msg=name)


def pair(base):
    plain = wrapped(base)
    fused = copy.deepcopy(plain)
    assert fused_lora.fuse_lora_projections(fused) == 2 * 7
    return plain, fused


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_fused_projections_compute_what_peft_computes(architecture):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SHAPE)) if architecture == "llama" else Qwen2ForCausalLM(Qwen2Config(**SHAPE))
    plain, fused = pair(base)
    if architecture == "qwen2":
        assert fused.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    assert_same_function(plain, fused, torch.randint(0, 120, (3, 17)))


def test_shared_input_projections_run_as_one_group(monkeypatch):
    """q/k/v are one node and gate/up another; o and down each their own: four per layer, not seven."""
    torch.manual_seed(0)
    _, fused = pair(LlamaForCausalLM(LlamaConfig(**SHAPE)))
    calls = []
    original = fused_lora._LoraGroup.apply
    monkeypatch.setattr(fused_lora._LoraGroup, "apply", lambda *a: calls.append(len(a[1])) or original(*a))
    fused(input_ids=torch.randint(0, 120, (2, 9)))
    assert sorted(calls) == sorted([3, 2, 1, 1] * 2)


def test_fused_projections_with_checkpointing_and_with_adapters_disabled():
    torch.manual_seed(0)
    plain, fused = pair(LlamaForCausalLM(LlamaConfig(**SHAPE)))
    ids = torch.randint(0, 120, (2, 11))
    for model in (plain, fused):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_function(plain, fused, ids)
    with torch.no_grad(), plain.disable_adapter(), fused.disable_adapter():
        base_logits = fused(input_ids=ids).logits
        torch.testing.assert_close(base_logits, plain(input_ids=ids).logits)
    with torch.no_grad():  # and the adapter is back afterwards
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert not torch.allclose(fused(input_ids=ids).logits, base_logits)


def test_fused_projections_train_the_same_loss_curve():
    """Five AdamW steps: the losses stay within 1e-5 of peft's (fp32 on CPU)."""
    torch.manual_seed(0)
    plain, fused = pair(LlamaForCausalLM(LlamaConfig(**SHAPE)))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 120, (4, 16), generator=g) for _ in range(5)]
    curves = []
    for model in (plain, fused):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward(); opt.step(); opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0][-1] < curves[0][0]  # it trained
    assert curves[1] == pytest.approx(curves[0], rel=1e-5, abs=1e-6)


def test_no_input_gradient_is_computed_where_no_one_needs_it(monkeypatch):
    """Without checkpointing, the first layer's q/k/v read the frozen embedding's output: their backward
    skips the base GEMMs for grad_x (and, on a 4-bit base, the dequantization), and the LoRA
    gradients are still peft's."""
    torch.manual_seed(0)
    plain, fused = pair(LlamaForCausalLM(LlamaConfig(**SHAPE)))
    ids = torch.randint(0, 120, (2, 9))
    loss_p = plain(input_ids=ids, labels=ids).loss
    loss_p.backward()
    loss_f = fused(input_ids=ids, labels=ids).loss
    reads, original = [], fused_lora.base_weight
    monkeypatch.setattr(fused_lora, "base_weight", lambda base, dtype: reads.append(base) or original(base, dtype))
    loss_f.backward()
    first_qkv = {fused.base_model.model.model.layers[0].self_attn.get_submodule(n).base_layer
                 for n in ("q_proj", "k_proj", "v_proj")}
    assert len(reads) == 2 * 7 - 3 and not first_qkv & set(reads)
    torch.testing.assert_close(loss_f, loss_p)
    grads_p = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads_f = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    assert grads_f.keys() == grads_p.keys() and len(grads_p) == 2 * 2 * 7
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-6, msg=name)


class DataSGD(torch.optim.Optimizer):
    """Writes the weights through .data, as bitsandbytes' 8-bit optimizers write them through a raw
    pointer: the tensors' version counters do not move."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def test_cast_adapter_weights_are_reused_until_an_optimizer_step_then_recast(monkeypatch):
    """A bf16 base with fp32 adapter weights: each group casts its weights once per optimizer step
    (not in every forward and backward), and after a step, even one that bypasses the version
    counters, the outputs are those of freshly cast weights."""
    torch.manual_seed(0)
    _, fused = pair(LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16))
    lora = [p for p in fused.parameters() if p.requires_grad]
    assert {p.dtype for p in lora} == {torch.float32}
    groups = {id(m.loraflow_group): m.loraflow_group for m in fused.modules() if hasattr(m, "loraflow_group")}
    assert len(groups) == 4 * 2
    casts, original = [], fused_lora._CastWeights.get

    def counting(self, *args):
        before = self.key
        weights = original(self, *args)
        if self.key != before:
            casts.append(self)
        return weights
    monkeypatch.setattr(fused_lora._CastWeights, "get", counting)
    ids = torch.randint(0, 120, (2, 9))
    for _ in range(2):  # two micro-batches of one step
        fused(input_ids=ids, labels=ids).loss.backward()
    assert len(casts) == len(groups)
    opt = DataSGD(lora, lr=1.0)
    with torch.no_grad():
        before = fused(input_ids=ids).logits
        opt.step()
        stepped = fused(input_ids=ids).logits
        assert len(casts) == 2 * len(groups) and not torch.equal(stepped, before)
        for g in groups.values():
            g.cast.key = None  # force a fresh cast
        torch.testing.assert_close(fused(input_ids=ids).logits, stepped, rtol=0, atol=0)


def test_unsupported_projections_keep_peft_path():
    """Dropout makes a projection another function (a random mask): it is left to peft."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**SHAPE)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    assert fused_lora.fuse_lora_projections(model) == 0


bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a project dependency")


def quantize_projections(model):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to("cpu"))  # quantized on the move
    return model


def test_fused_projections_on_a_4bit_base_compute_what_peft_and_bitsandbytes_compute():
    torch.manual_seed(0)
    plain, fused = pair(quantize_projections(LlamaForCausalLM(LlamaConfig(**SHAPE))))
    assert_same_function(plain, fused, torch.randint(0, 120, (3, 17)))
