"""The merge on the 8B architecture (time, peak CPU memory, and the merge check), on a GPU machine:

1. a random-init Llama-3.1-8B base in 5 GB safetensors shards, and a LoRA adapter of realistic scale
   (r=16 on all 7 projections, B drawn so that |scale * B @ A| / |W| = 0.05 per weight, Frobenius);
2. the streaming merge (loraflow/merging.py) in a child process: its time and peak CPU memory;
3. the merge gate (tasks/merge.py's compare): merged vs base + adapter on 8 probe prompts, logits
   and 32 greedy tokens, in bf16;
   and again in float32 (merged in float32 against base + adapter in float32);
4. the same adapter taken as a QLoRA adapter: the trained model is the 4-bit nf4 base + adapter;
   merging into the dequantized 4-bit base and into the original 16-bit base, side by side.

    python benchmarks/merge_bench.py          # JSON lines on stdout
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.train_bench import save_random_llama  # noqa: E402
from loraflow.generation import generate_ids_hf  # noqa: E402
from tasks.merge import compare  # noqa: E402

BASE, ADAPTER = "/dev/shm/m-base", "/dev/shm/m-adapter"
RELATIVE_DELTA = 0.05


def make_adapter():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16, device_map={"": 0})
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, module in peft.named_modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                b.normal_()
                delta = module.scaling["default"] * (b.float() @ a.float())
                b.mul_(RELATIVE_DELTA * module.base_layer.weight.float().norm() / delta.norm())
    peft.save_pretrained(ADAPTER, safe_serialization=True)
    del peft, model
    torch.cuda.empty_cache()


def probe_prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 128000, (int(L),), generator=g).tolist() for L in torch.randint(64, 200, (n,), generator=g)]


@torch.no_grad()
def probe(model, prompts):
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    logits = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float() * mask.cuda()[..., None]
    greedy = generate_ids_hf(model, prompts, pad_id=0, stop_ids=[], max_new_tokens=32, batch_size=len(prompts))
    return logits.cpu(), [g["ids"] for g in greedy]


def trained(quantized: bool, prompts, dtype=torch.bfloat16):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from loraflow.modeling import quantization_config
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype, device_map={"": 0},
                                                quantization_config=quantization_config("qlora", dtype) if quantized else None)
    model = PeftModel.from_pretrained(base, ADAPTER).eval()
    out = probe(model, prompts)
    del model, base
    torch.cuda.empty_cache()
    return out


def merged(nf4_base: bool, prompts, out_dir: str, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM
    child = subprocess.run([sys.executable, "-c", (
        "import json, torch; from pathlib import Path; from loraflow.merging import merge_shards; "
        f"print(json.dumps(merge_shards(Path('{BASE}'), Path('{ADAPTER}'), Path('{out_dir}'), out_dtype=torch.{str(dtype)[6:]}, "
        f"nf4_base={nf4_base}, work='cuda')))")], cwd=ROOT, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(child.stderr[-2000:])
    info = json.loads(child.stdout.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, device_map={"": 0}).eval()
    out = probe(model, prompts)
    del model
    torch.cuda.empty_cache()
    return out, info


def main():
    t = time.perf_counter()
    from transformers import LlamaConfig  # noqa: F401
    save_random_llama(BASE, layers=32, max_shard_size="5GB")
    make_adapter()
    print(json.dumps({"setup_s": round(time.perf_counter() - t, 1),
                      "base_gib": round(sum(p.stat().st_size for p in Path(BASE).glob("*.safetensors")) / 2**30, 2)}), flush=True)
    prompts = probe_prompts()
    lora_logits, lora_greedy = trained(False, prompts)
    (m_logits, m_greedy), info = merged(False, prompts, "/dev/shm/m-merged")
    print(json.dumps({"case": "lora: merged vs base+adapter (bf16)", **compare(lora_logits, m_logits, lora_greedy, m_greedy),
                      "merge": info}), flush=True)
    f_logits, f_greedy = trained(False, prompts, torch.float32)
    (mf_logits, mf_greedy), f_info = merged(False, prompts, "/dev/shm/m-merged-f32", torch.float32)
    print(json.dumps({"case": "lora: merged vs base+adapter (float32)", **compare(f_logits, mf_logits, f_greedy, mf_greedy),
                      "merge": f_info}), flush=True)
    shutil.rmtree("/dev/shm/m-merged-f32")
    q_logits, q_greedy = trained(True, prompts)
    (d_logits, d_greedy), d_info = merged(True, prompts, "/dev/shm/m-merged-nf4")
    print(json.dumps({"case": "qlora: merged into the dequantized nf4 base vs nf4 base+adapter",
                      **compare(q_logits, d_logits, q_greedy, d_greedy), "merge": d_info}), flush=True)
    print(json.dumps({"case": "qlora: merged into the original bf16 base vs nf4 base+adapter",
                      **compare(q_logits, m_logits, q_greedy, m_greedy)}), flush=True)


if __name__ == "__main__":
    main()
