"""The streaming merge (loraflow/merging.py): shard by shard it gives what peft's merge_and_unload
gives, into the original or the nf4-dequantized base, and it never holds the whole model in memory."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from loraflow.errors import LoraflowError
from loraflow.merging import base_shards, is_quantized_linear, merge_shards, nf4_roundtrip


def make_sharded_base(path, hidden=32, layers=2, vocab=400, inter=64, shard="40KB"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    return path


def make_adapter(base_dir, adapter_dir, modules_to_save=("lm_head",)):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                            modules_to_save=list(modules_to_save), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.01)  # a trained head differs from the base's
    peft.save_pretrained(adapter_dir, safe_serialization=True)


def peft_merged(base_dir, adapter_dir, nf4_base=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if nf4_base:
        with torch.no_grad():
            for name, p in base.named_parameters():
                if is_quantized_linear(name, p):
                    p.copy_(nf4_roundtrip(p, torch.bfloat16).float())
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = make_sharded_base(root / "base")
    make_adapter(base, root / "adapter")
    return base, root / "adapter", root


@pytest.mark.parametrize("nf4_base", [False, True], ids=["original", "dequantized-nf4"])
def test_streaming_merge_equals_peft_merge_and_unload(base_and_adapter, nf4_base):
    base, adapter, root = base_and_adapter
    assert len(base_shards(base)) >= 3, "the test needs a sharded base"
    out = root / f"merged-{nf4_base}"
    info = merge_shards(base, adapter, out, out_dtype=torch.float32, nf4_base=nf4_base)
    assert info["shards"] == len(base_shards(base)) and info["merged_weights"] == 2 * 7 and info["replaced_weights"] == 1
    merged = {k: v for shard in base_shards(out) for k, v in load_file(str(shard)).items()}
    expected = peft_merged(base, adapter, nf4_base)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
    original = {k: v for shard in base_shards(base) for k, v in load_file(str(shard)).items()}
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert len(changed) == 2 * 7 + 1, "every adapted projection and the trained head change, nothing else"


def test_an_adapter_for_another_base_is_refused(base_and_adapter, tmp_path):
    _, adapter, _ = base_and_adapter
    other = make_sharded_base(tmp_path / "other", layers=1)
    with pytest.raises(LoraflowError, match="adapter weights have no base weight"):
        merge_shards(other, adapter, tmp_path / "out")


def test_streaming_merge_holds_about_one_shard_not_the_model(tmp_path):
    """A 300 MB base in 10 MB shards: the merging process grows by a few of its largest tensors (the
    16 MB embedding), not by the model."""
    base = make_sharded_base(tmp_path / "big", hidden=512, layers=12, vocab=8000, inter=3072, shard="10MB")
    make_adapter(base, tmp_path / "adapter", modules_to_save=())
    model_bytes = sum(p.stat().st_size for p in base_shards(base))
    child = subprocess.run([sys.executable, "-c", (
        "import json, sys, torch; from pathlib import Path; from loraflow.merging import merge_shards; "
        # a first merge sets up what any merge sets up once (BLAS buffers, allocator arenas); the next two
        # are measured: resident memory also moves with the kernel's own timing (huge pages collapsed in
        # the background, file pages), by up to ~50 MB under the full suite, so the smaller is the merge's
        "base, adapter, out = map(Path, sys.argv[1:]); "
        "merge_shards(base, adapter, out / 'warm'); "
        "runs = [merge_shards(base, adapter, out / str(i)) for i in range(2)]; "
        "print(json.dumps(min(runs, key=lambda r: r['peak_rss_gib'] - r['rss_before_gib'])))"),
        str(base), str(tmp_path / "adapter"), str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, check=True)
    info = json.loads(child.stdout.strip().splitlines()[-1])
    growth = (info["peak_rss_gib"] - info["rss_before_gib"]) * 2**30
    largest = 8000 * 512 * 4
    assert info["shards"] >= 20
    assert growth < min(0.25 * model_bytes, 4 * largest), f"grew {growth / 1e6:.0f} MB merging a {model_bytes / 1e6:.0f} MB model"


@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
def test_token_rows_and_a_grown_vocabulary_merge_as_peft_computes_them(tmp_path, tied):
    """Two tokens added (the vocabulary grown as training grows it) and three token rows trained beside
    the adapter: the streamed merge gives the logits of PEFT's base + adapter, on the new ids too."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from loraflow.modeling import fit_vocab
    from loraflow.training import token_indices_by_module
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
                     ).save_pretrained(tmp_path / "base", safe_serialization=True, max_shard_size="20KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert fit_vocab(model, 62) == 2
    indices = token_indices_by_module(model, [3, 60, 61])
    assert set(indices) == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"})
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                            trainable_token_indices=indices, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # trained rows differ from where they started
    peft.save_pretrained(tmp_path / "adapter", safe_serialization=True)

    info = merge_shards(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", out_dtype=torch.float32,
                        compute_dtype=torch.float32, vocab_size=62)
    assert info["rows_added"] == 2 and info["token_rows_replaced"] == 3 * len(indices)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.vocab_size == 62 and merged.get_input_embeddings().weight.shape[0] == 62
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    fit_vocab(base, 62)
    trained = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 60, 5, 61, 3, 7, 60]])
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    grown = merged.get_input_embeddings().weight
    assert not torch.equal(grown[60], grown[61]), "the new tokens' trained rows replaced the average they started as"


def test_grown_rows_start_as_the_average_token():
    from loraflow.modeling import grown_rows
    w = torch.randn(5, 3, dtype=torch.bfloat16)
    grown = grown_rows(w, 7)
    assert torch.equal(grown[:5], w) and torch.equal(grown[5], grown[6])
    assert torch.equal(grown[5], w.float().mean(0).to(torch.bfloat16))
