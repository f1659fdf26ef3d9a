"""The fused QLoRA projection (fastpath.fuse_qlora_projections) computes what peft + bitsandbytes
compute: same loss, same LoRA and input gradients, on a tiny Llama with real nf4 weights (bitsandbytes
quantizes on CPU too)."""
import copy

import pytest
import torch

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


def test_fused_qlora_projection_matches_peft_and_bitsandbytes():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow import fastpath
    torch.manual_seed(0)
    base = quantize_projections(LlamaForCausalLM(LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)))
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    fused = copy.deepcopy(plain)
    assert fastpath.fuse_qlora_projections(fused) == 2 * 7

    ids = torch.randint(0, 120, (3, 17))
    results = []
    for model in (plain, fused):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, embeds.grad.clone()))
    (loss_p, grads_p, dx_p), (loss_f, grads_f, dx_f) = results
    assert len(grads_p) == 2 * 2 * 7 and grads_p.keys() == grads_f.keys()  # lora_A and lora_B of 14 projections
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-4, atol=1e-6)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-6, msg=name)
