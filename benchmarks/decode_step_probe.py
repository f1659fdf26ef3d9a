"""Diagnostic for evaluation's generation speed: time one greedy decode step of the 8B architecture at
batch B with a static KV cache, eager and under torch.compile(mode="reduce-overhead") (a CUDA graph).

    python benchmarks/decode_step_probe.py CKPT [--batch 128] [--prompt 256]
"""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt"); p.add_argument("--batch", type=int, default=128); p.add_argument("--prompt", type=int, default=256)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, StaticCache
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.bfloat16, device_map={"": 0}).eval()
    steps = 32
    ids = torch.randint(10, 128000, (a.batch, a.prompt), device="cuda")

    def run(step_fn, label):
        cache = StaticCache(config=model.config, max_cache_len=a.prompt + steps + 8)
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                        cache_position=torch.arange(a.prompt, device="cuda"))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for k in range(steps):
                pos = torch.tensor([a.prompt + k], device="cuda")
                torch.cuda.synchronize(); t = time.perf_counter()
                logits = step_fn(nxt, cache, pos)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize(); times.append(time.perf_counter() - t)
        med = sorted(times[4:])[len(times[4:]) // 2]
        print(json.dumps({"decode_step": label, "batch": a.batch, "median_ms": round(1000 * med, 2),
                          "first_ms": round(1000 * times[0], 1), "tok_s": round(a.batch / med)}), flush=True)

    def eager(tok, cache, pos):
        return model(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos).logits

    run(eager, "eager")
    compiled_forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def compiled(tok, cache, pos):
        return compiled_forward(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos).logits.clone()

    t = time.perf_counter()
    run(compiled, "compiled reduce-overhead")
    print(json.dumps({"compile_and_run_s": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
