# Copied unchanged from ../shared/bench/peers_best.py (Unsloth and HF + Liger at their best), so it travels to the GPU machine with the tree.
"""The strongest peers, for side-by-side runs on one GPU: Unsloth, and Hugging Face with Liger and no checkpointing.
Random-init Llama-3.1-8B architecture; LoRA r=16, alpha 32, all 7 projections; random tokens, every token trained.

  python3 peers_best.py make CKPT [LAYERS]                     # random bf16 checkpoint + a stub tokenizer
  python3 peers_best.py hf CKPT SEQ BATCH CKPT01 LIGER01 [METHOD] # plain HF (+Liger), checkpointing on/off
  python3 peers_best.py unsloth CKPT SEQ BATCH METHOD GC         # Unsloth FastLanguageModel; GC: unsloth|true|false
  python3 peers_best.py gen CKPT ROWS NEW BATCH                  # HF batched greedy generate, static cache (eval peer)
Each prints one JSON line.
"""
import json, os, sys, time

import torch

PEAK_TFLOPS = 989.0
N_TOTAL = 8030261248
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(path, layers="32"):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=int(layers), num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    t = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)
    m.save_pretrained(path, safe_serialization=True)
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i + 4 for i in range(4000)})
    tk = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                 bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tk.save_pretrained(path)
    print(json.dumps({"made": path, "layers": int(layers), "s": round(time.time() - t, 1)}))


def loop(m, opt, seq, batch, vocab, steps=7):
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize(); t = time.time()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.time() - t)
    st = sorted(times[2:])[len(times[2:]) // 2]
    return st, out.loss.item()


def report(tag, m, seq, batch, st, loss, load_s, base_mem, **kw):
    c = m.config
    tok_s = batch * seq / st
    mfu = tok_s * (4 * N_TOTAL + 12 * c.num_hidden_layers * c.hidden_size * seq) / (PEAK_TFLOPS * 1e12)
    print(json.dumps({"peer": tag, "seq": seq, "batch": batch, "load_s": round(load_s, 1),
                      "weights_gib": round(base_mem / 2**30, 2),
                      "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                      "step_s": round(st, 3), "tok_s": round(tok_s), "mfu": round(mfu, 3),
                      "loss": round(loss, 3), **kw}), flush=True)


def hf(path, seq, batch, ckpt, liger, method="lora"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    seq, batch, ckpt, liger = int(seq), int(batch), ckpt == "1", liger == "1"
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    if method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    m = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, **kw)
    load_s = time.time() - t0
    base_mem = torch.cuda.memory_allocated()
    m.config.use_cache = False
    m.train()
    if method == "qlora":
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=ckpt)
    elif ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS))
    if ckpt:
        m.enable_input_require_grads()
    params = [p for p in m.parameters() if p.requires_grad]
    if method == "qlora":
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    st, loss = loop(m, opt, seq, batch, m.config.vocab_size)
    report(f"hf-{method}{'-liger' if liger else ''}{'-ckpt' if ckpt else '-nockpt'}", m, seq, batch, st, loss, load_s, base_mem)


def unsloth(path, seq, batch, method, gc):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from unsloth import FastLanguageModel
    seq, batch = int(seq), int(batch)
    t0 = time.time()
    m, tok = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=seq, dtype=torch.bfloat16,
                                               load_in_4bit=(method == "qlora"), local_files_only=True)
    load_s = time.time() - t0
    base_mem = torch.cuda.memory_allocated()
    gcv = {"unsloth": "unsloth", "true": True, "false": False}[gc]
    m = FastLanguageModel.get_peft_model(m, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                         target_modules=TARGETS, use_gradient_checkpointing=gcv, random_state=0)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    if method == "qlora":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    st, loss = loop(m, opt, seq, batch, 128256)
    import unsloth as u
    report(f"unsloth-{method}-gc_{gc}", m, seq, batch, st, loss, load_s, base_mem, unsloth=getattr(u, "__version__", "?"))


def gen(path, rows, new, batch):
    """HF generate, batched, left-padded, static cache: what a careful user of transformers would run."""
    from transformers import AutoModelForCausalLM
    rows, new, batch = int(rows), int(new), int(batch)
    m = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, dtype=torch.bfloat16)
    m.eval()
    g = torch.Generator().manual_seed(0)  # the project's generate_bench prompts: log-normal, median 150, 16..1024
    L = torch.exp(torch.randn(rows, generator=g) * 0.7 + torch.log(torch.tensor(150.0))).clamp(16, 1024).long()
    prompts = [torch.randint(10, 128000, (int(n),), generator=g) for n in L]
    lens = [len(p) for p in prompts]
    order = sorted(range(rows), key=lambda i: lens[i])
    t = time.time(); produced = 0
    for s in range(0, rows, batch):
        idx = order[s:s + batch]
        width = max(lens[i] for i in idx)
        ids = torch.full((len(idx), width), 2, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - lens[i]:] = prompts[i]; att[r, width - lens[i]:] = 1
        with torch.no_grad():
            out = m.generate(input_ids=ids.cuda(), attention_mask=att.cuda(), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, cache_implementation="static", pad_token_id=2)
        produced += (out.shape[1] - width) * len(idx)
    torch.cuda.synchronize()
    dt = time.time() - t
    print(json.dumps({"peer": "hf-generate-batched-static", "rows": rows, "new": new, "batch": batch,
                      "s": round(dt, 2), "tok_s": round(produced / dt), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make": make, "hf": hf, "unsloth": unsloth, "gen": gen}[cmd](*args)
