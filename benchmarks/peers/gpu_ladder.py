# Copied unchanged from ../shared/bench/gpu_ladder.py (the peer figures in peers-h200.md), so it travels to the GPU machine with the tree.
"""Memory-ladder baseline on a GPU: plain transformers + peft + bitsandbytes, the stack
that Axolotl/TRL users run. Random-init Llama-3.1-8B architecture (no hub here): memory
and speed do not depend on weight values.

  python3 gpu_ladder.py make CKPT_DIR           # write a random bf16 checkpoint
  python3 gpu_ladder.py rung NAME CKPT_DIR SEQ BATCH   # one rung, prints a JSON line
"""
import json, os, sys, time

import torch

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (datasheet)


def cfg():
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def make(path):
    from transformers import LlamaForCausalLM
    t = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg())
    m.save_pretrained(path, safe_serialization=True)
    print(json.dumps({"made": path, "params": sum(p.numel() for p in m.parameters()), "s": round(time.time() - t, 1)}))


def rung(name, path, seq, batch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    seq, batch = int(seq), int(batch)
    if "liger" in name:  # peer: Liger Kernel's fused linear cross-entropy, RMSNorm, SwiGLU, RoPE
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    if name.startswith("qlora"):
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    elif name.startswith("lora8"):
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    t0 = time.time()
    m = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, **kw)
    load_s = time.time() - t0
    n_total = 8030261248  # Llama-3.1-8B; 4-bit params count packed, so use the real figure
    base_mem = torch.cuda.memory_allocated()
    m.config.use_cache = False
    m.train()  # gradient checkpointing only acts in training mode
    if name.startswith(("qlora", "lora8")):
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if name == "full":
        params = [p for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        flops_per_tok = 6 * n_total
    else:
        lc = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        m = get_peft_model(m, lc)
        m.enable_input_require_grads()
        params = [p for p in m.parameters() if p.requires_grad]
        if name.startswith("qlora"):
            import bitsandbytes as bnb
            opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
        else:
            opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
        flops_per_tok = 4 * n_total  # frozen base: forward + input-grad backward
    n_train = sum(p.numel() for p in params)
    cfgm = m.config
    attn_flops_per_tok = 12 * cfgm.num_hidden_layers * cfgm.hidden_size * seq  # fwd+bwd causal-ish upper bound
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfgm.vocab_size, (batch, seq), device="cuda")
    times = []
    for step in range(7):
        torch.cuda.synchronize(); t = time.time()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.time() - t)
    st = sorted(times[2:])[len(times[2:]) // 2]
    tok_s = batch * seq / st
    mfu = tok_s * (flops_per_tok + attn_flops_per_tok) / (PEAK_TFLOPS * 1e12)
    print(json.dumps({
        "rung": name, "seq": seq, "batch": batch, "params": n_total, "trainable": n_train,
        "load_s": round(load_s, 1), "weights_gib": round(base_mem / 2**30, 2),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "step_s": round(st, 3), "tok_s": round(tok_s), "mfu": round(mfu, 3),
        "loss": round(out.loss.item(), 3)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        rung(*sys.argv[2:6])
