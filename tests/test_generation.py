"""Batched greedy generation equals one row at a time; the merge comparison catches a difference."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.generation import generate_texts
from tasks.merge import compare


def test_batched_greedy_equals_one_at_a_time(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in ["Hi", "What is the capital of France and of Spain?", "Add two and three.", "x " * 30]]
    kw = dict(stop_ids=[tok.eos_token_id], max_new_tokens=12)
    batched = generate_texts(model, tok, prompts, batch_size=4, **kw)
    single = [generate_texts(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == single
    assert all(r["new_tokens"] >= 1 for r in batched)


def test_compare_reports_logit_and_greedy_differences():
    a = torch.zeros(2, 3, 5)
    b = a.clone()
    b[1, 2, 4] = 0.5
    out = compare(a, b, ["x", "y"], ["x", "z"])
    assert out["max_abs_logit_diff"] == 0.5 and out["greedy_agreement"] == 0.5
    assert compare(a, a, ["x"], ["x"])["max_abs_logit_diff"] == 0.0


def test_merge_tolerance_grows_with_the_logits_scale_only_by_rtol():
    """float32 rounding of a merge grows with the logits: a 1.4e-4 difference (seen at lr 0.01) passes
    beside logits of 30, fails beside logits of 3, and a wrong merge (0.05) fails beside either."""
    from loraflow.params import MergeParams
    from tasks.merge import verdict
    params = MergeParams()

    def passes(diff, scale, greedy=1.0):
        return verdict({"max_abs_logit_diff": diff, "max_abs_logit": scale, "greedy_agreement": greedy}, params)[1]
    assert passes(1.4e-4, 30.0) and not passes(1.4e-4, 3.0)
    assert not passes(0.05, 30.0) and not passes(0.05, 3.0)
    assert not passes(0.0, 30.0, greedy=0.875)  # one probe's continuation changed
    a = torch.tensor([[-30.0, 2.0]])
    assert compare(a, a + 1e-4, ["x"], ["x"])["max_abs_logit"] == 30.0


def test_row_loop_equals_one_row_hf_generate(tiny_model_dir):
    """Our batch-invariant decode loop (the one captured in a CUDA graph on a GPU; eager here) gives what
    HF generate gives one row at a time, token for token, rows of different lengths and a short last batch."""
    from loraflow.generation import generate_ids_batch_invariant, generate_ids_hf
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for c in ["Hi", "What is two and two?", "y " * 40, "Tell me", "z"]]
    kw = dict(pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], max_new_tokens=10)
    ours = generate_ids_batch_invariant(model, prompts, batch_size=2, **kw)
    single = [generate_ids_hf(model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert ours == single
    no_eos = generate_ids_batch_invariant(model, prompts, batch_size=3, **{**kw, "stop_ids": []})
    assert no_eos == [generate_ids_hf(model, [p], batch_size=1, **{**kw, "stop_ids": []})[0] for p in prompts]
    assert all(len(r["ids"]) == 10 for r in no_eos)


def tiny_causal_lm(model_type: str, **extra):
    from transformers import AutoConfig
    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type,extra", [("qwen2", {}), ("qwen3", {"head_dim": 16}), ("mistral", {"sliding_window": None})])
def test_row_loop_matches_hf_generate_on_other_architectures(model_type, extra):
    """q/k/v biases (Qwen2), per-head q/k norms (Qwen3) and Mistral go through the same row loop."""
    from loraflow.generation import generate_ids_batch_invariant, generate_ids_hf
    model = tiny_causal_lm(model_type, **extra)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 9, 1, 17, 5)]
    kw = dict(pad_id=0, stop_ids=[], max_new_tokens=8)
    assert generate_ids_batch_invariant(model, prompts, batch_size=2, **kw) == \
        [generate_ids_hf(model, [p], batch_size=1, **kw)[0] for p in prompts]


def test_row_loop_output_does_not_depend_on_batch_or_prefill_chunks(tiny_model_dir):
    from loraflow.generation import generate_ids_batch_invariant
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (12, 2, 30, 7, 7, 19)]
    kw = dict(pad_id=0, stop_ids=[], max_new_tokens=6)
    alone = [generate_ids_batch_invariant(model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert generate_ids_batch_invariant(model, prompts, batch_size=6, **kw) == alone
    assert generate_ids_batch_invariant(model, prompts, batch_size=4, prefill_tokens=20, **kw) == alone  # prefill in chunks


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_projection_groups_give_each_linear_its_own_output(model_type):
    """Inside batch_invariant, q/k/v and gate/up are one group each per layer (Qwen2's q/k/v biases
    included); a member returns what nn.Linear gives it, in the order the model calls them, out of
    order, or with another input."""
    from loraflow.batch_invariant import batch_invariant, projection_groups
    model = tiny_causal_lm(model_type)
    groups = projection_groups(model)
    assert [[type(m).__name__ for m in g] for g in groups] == [["Linear"] * 3, ["Linear"] * 2] * 2
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(3, 32), torch.randn(3, 32)
    expected = {n: getattr(attn, n).forward(x) for n in ("q_proj", "k_proj", "v_proj")}
    with batch_invariant(model, 2, 16):
        for order in (("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj")):
            for name in order:
                assert torch.equal(getattr(attn, name)(x), expected[name]), name
        assert torch.equal(attn.q_proj(x), expected["q_proj"])
        assert torch.equal(attn.k_proj(y), torch.nn.functional.linear(y, attn.k_proj.weight, attn.k_proj.bias))
        assert torch.equal(attn.k_proj(x), expected["k_proj"])  # the pending k of y's call is not x's
    assert "forward" not in vars(attn.q_proj)  # restored on exit


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": None}), ("qwen2", {}),
                                              ("qwen3", {})])
def test_silu_mlps_are_taken_and_given_back(model_type, extra):
    """Each SiLU MLP's forward is ours inside (SiLU x up in one kernel on a GPU, the module's own on CPU:
    the same output) and the class's again after; an MLP with another activation is left alone."""
    from loraflow.batch_invariant import batch_invariant
    model = tiny_causal_lm(model_type, **extra)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 32)
    expected = mlp(x)
    with batch_invariant(model, 2, 16):
        assert all("forward" in vars(layer.mlp) for layer in model.model.layers)
        assert torch.equal(mlp(x), expected)
    assert "forward" not in vars(mlp)
    gelu = tiny_causal_lm(model_type, hidden_act="gelu", **extra)
    with batch_invariant(gelu, 2, 16):
        assert "forward" not in vars(gelu.model.layers[0].mlp)


def test_batch_invariant_takes_the_rotary_embedding_and_gives_it_back():
    """The modeling module's apply_rotary_pos_emb is ours inside (the kernels' on a GPU, HF's on CPU) and
    HF's again after."""
    import sys
    from loraflow.batch_invariant import batch_invariant
    model = tiny_causal_lm("llama")
    modeling = sys.modules[type(model).__module__]
    original = modeling.apply_rotary_pos_emb
    q, k, cos, sin = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    with batch_invariant(model, 1, 8):
        assert modeling.apply_rotary_pos_emb is not original
        assert all(torch.equal(a, b) for a, b in zip(modeling.apply_rotary_pos_emb(q, k, cos, sin), original(q, k, cos, sin)))
    assert modeling.apply_rotary_pos_emb is original


def test_prefill_chunks_bound_packed_tokens():
    from loraflow.generation import prefill_chunks
    assert prefill_chunks([2, 3, 5, 5, 9], 10) == [(0, 3), (3, 4), (4, 5)]
    assert prefill_chunks([9, 5, 5, 3, 2], 10) == [(0, 1), (1, 3), (3, 5)]
    assert prefill_chunks([40], 10) == [(0, 1)]  # a row longer than the bound goes alone
    assert prefill_chunks([1, 1, 1], 100) == [(0, 3)]


def test_head_dims_the_kernels_cannot_tile_fall_back():
    from loraflow.batch_invariant import unsupported_reason
    assert unsupported_reason(tiny_causal_lm("qwen3", head_dim=16), on_gpu=True) is None
    assert unsupported_reason(tiny_causal_lm("qwen3", head_dim=24), on_gpu=True) == \
        "head_dim 24 (the GPU kernels take powers of two from 16)"
    assert unsupported_reason(tiny_causal_lm("qwen3", head_dim=24)) is None  # on CPU the loop runs PyTorch ops


def test_unsupported_model_type_falls_back_to_hf_generate(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from loraflow.generation import generate_ids_hf, generate_ids
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    prompts = [[5, 6, 7], [8, 9]]
    kw = dict(pad_id=0, stop_ids=[], max_new_tokens=4)
    with caplog.at_level("WARNING", logger="loraflow.generation"):
        out = generate_ids(model, prompts, batch_size=2, **kw)
    assert "not the batch-invariant loop: model type 'gpt2'" in caplog.text
    assert out == generate_ids_hf(model, prompts, batch_size=2, **kw)


def test_generation_logs_its_progress_with_the_time_left(tiny_model_dir, caplog):
    """A long evaluation shows it is moving: rows done, the share, and an estimate of the time left."""
    import logging
    from loraflow import generation
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [f"question {i}" for i in range(5)]
    original = generation.BatchProgress.__init__
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="loraflow.generation"):
        mp.setattr(generation.BatchProgress, "__init__", lambda self, total: original(self, total, every_s=0.0))
        generate_texts(model, tok, prompts, stop_ids=[tok.eos_token_id], max_new_tokens=3, batch_size=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generated ")]
    assert [l.split()[1] for l in lines] == ["2/5", "4/5", "5/5"], lines
    assert "s left" in lines[0] and "s left" not in lines[-1]



def test_row_loop_cache_holds_each_row_by_its_own_length(monkeypatch):
    """One long prompt among short ones: the loop's KV pool holds each row's own prompt and new tokens
    (what memplan.cache_slots says), not every row at the longest, and the rows still equal HF generate
    one at a time. A batch that needs more slots than the pool has is refused, naming both."""
    from loraflow import batch_invariant as bi
    from loraflow.generation import generate_ids_batch_invariant, generate_ids_hf
    from loraflow.memplan import cache_slots
    model = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 40, 4, 5)]
    kw = dict(pad_id=0, stop_ids=[], max_new_tokens=6)
    made, original = [], bi.RowKVCache
    monkeypatch.setattr(bi, "RowKVCache", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    ours = generate_ids_batch_invariant(model, prompts, batch_size=2, **kw)
    assert ours == [generate_ids_hf(model, [p], batch_size=1, **kw)[0] for p in prompts]
    # batches [3, 4] and [5, 40]: the larger needs 45 + 2 * 6 slots; padded to its longest, 2 * (40 + 6)
    assert made[0].slots == cache_slots([len(p) for p in prompts], 2, 6) == 57
    assert made[0].keys[0].shape[1] == 57
    with pytest.raises(ValueError, match="2 rows needing 58 cache slots; the cache has 2 rows and 57 slots"):
        made[0].place_rows([11, 47])


@pytest.mark.parametrize("model_type,ragged", [("llama", True), ("phi3", False)])
def test_evaluate_batch_plan_follows_the_loop_that_will_run(model_type, ragged, monkeypatch, tiny_model_dir):
    """On a GPU (its free memory stood in for: none here), evaluate's auto batch is planned with the
    ragged cache where the batch-invariant loop runs, and with HF generate's padded one where it does
    not (phi3 here): one long prompt among short ones makes the two differ."""
    from loraflow import memplan
    from loraflow.batch_invariant import unsupported_reason
    from loraflow.evaluation import GenerationSettings, generation_batch_size
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["a b"] * 63 + ["a " * 400]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    model = tiny_causal_lm(model_type, pad_token_id=0, eos_token_id=1, bos_token_id=2, head_dim=16)
    assert (unsupported_reason(model, on_gpu=True) is None) == ragged
    arch = memplan.Arch.from_config(model.config)
    # free memory for 32 rows of the ragged plan: the padded plan fits fewer
    free = memplan.generation_bytes(arch, 32, lengths, 16, act_bytes=4) / (1 - memplan.SAFETY_MARGIN)
    assert memplan.generation_batch(arch, lengths, 16, free, act_bytes=4, ragged=False) < 32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free, 2 * free))
    batch = generation_batch_size(model, tok, prompts, GenerationSettings(16, "auto", False))
    assert batch == memplan.generation_batch(arch, lengths, 16, free, act_bytes=4, ragged=ragged)
    assert (batch == 32) == ragged
