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
