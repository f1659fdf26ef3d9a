"""Batched greedy generation equals one row at a time; the merge comparison catches a difference."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.generation import greedy_generate
from tasks.merge import compare


def test_batched_greedy_equals_one_at_a_time(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in ["Hi", "What is the capital of France and of Spain?", "Add two and three.", "x " * 30]]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    single = [greedy_generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(r["new_tokens"] >= 1 for r in batched)


def test_compare_reports_logit_and_greedy_differences():
    a = torch.zeros(2, 3, 5)
    b = a.clone()
    b[1, 2, 4] = 0.5
    out = compare(a, b, ["x", "y"], ["x", "z"])
    assert out["max_abs_logit_diff"] == 0.5 and out["greedy_agreement"] == 0.5
    assert compare(a, a, ["x"], ["x"])["max_abs_logit_diff"] == 0.0


def test_static_cache_decode_loop_equals_one_row_hf_generate(tiny_model_dir):
    """Our fixed-shape decode loop (the one compiled into a CUDA graph on a GPU; eager here) gives what
    HF generate gives one row at a time, token for token, rows of different lengths and a short last batch."""
    from loraflow.generation import greedy_decode_rows, greedy_generate_ids
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for c in ["Hi", "What is two and two?", "y " * 40, "Tell me", "z"]]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10)
    ours = greedy_decode_rows(model, prompts, batch_size=2, **kw)
    single = [greedy_generate_ids(model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert ours == single
    no_eos = greedy_decode_rows(model, prompts, batch_size=3, **{**kw, "eos_id": None})
    assert no_eos == [greedy_generate_ids(model, [p], batch_size=1, **{**kw, "eos_id": None})[0] for p in prompts]
    assert all(len(r["ids"]) == 10 for r in no_eos)
