"""The memory plan's arithmetic (loraflow/memplan/): hand-computed cases, autograd's own count of
saved activations, the weights the H200 peers measured, and the choice of settings under a budget."""
import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from loraflow import memplan, planning
from loraflow.errors import LoraflowError
from loraflow.memplan import Arch, Setup
from loraflow.params import TrainParams

# h=8, i=16, 2 layers, 2 heads of 4 (one kv head), vocab 10, untied head
TINY = Arch(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10, tied=False)
LLAMA_31_8B = Arch(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False)


def test_parameter_counts_by_hand():
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate 8*16 + up 8*16 + down 16*8 = 576
    assert TINY.linear_params() == 2 * 576
    assert TINY.other_params() == 10 * 8 + 10 * 8 + (2 * 2 + 1) * 8
    assert LLAMA_31_8B.params() == 8_030_261_248  # Llama-3.1-8B's published count


def test_weight_bytes_by_hand():
    s = Setup(rank=2, act_bytes=2)
    assert memplan.weight_bytes(TINY, s) == 1352 * 2
    # int8 linears + an fp32 scale per output row (64 rows a layer) + bf16 rest
    assert memplan.weight_bytes(TINY, Setup(method="lora8")) == 1152 + 128 * 4 + 200 * 2
    # nf4: half a byte, an 8-bit scale per 64 and an fp32 scale per 64*256
    assert memplan.weight_bytes(TINY, Setup(method="qlora")) == pytest.approx(576 + 18 + 1152 / 16384 * 4 + 400)


def test_adapter_bytes_by_hand():
    # r * (in + out) per projection: 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) = 256 a layer
    assert memplan.adapter_params(TINY, Setup(rank=2)) == 512
    # fp32 weight 4 + grad 4 + two fp32 moments 8 + autocast's bf16 copy 2
    assert memplan.adapter_bytes(TINY, Setup(rank=2)) == 512 * 18
    assert memplan.adapter_bytes(TINY, Setup(rank=2, act_bytes=4)) == 512 * 16
    assert memplan.adapter_bytes(TINY, Setup(rank=2, optimizer="adamw_8bit")) == 512 * 12


def test_layer_activations_by_hand():
    # fused: norms 2*(16+4), normed inputs 16+16, attention 2*(2*8+2*4)+4*2, gate/up 2*2*16, down input 32, lora 7*2*2
    assert memplan.layer_saved_bytes(TINY, Setup(rank=2)) == 40 + 32 + 56 + 64 + 32 + 28
    # plain: fp32 norm inputs 2*(32+4), gate + silu + up 3*2*16
    assert memplan.layer_saved_bytes(TINY, Setup(rank=2, fused=False)) == 72 + 32 + 56 + 96 + 32 + 28
    # 8-bit: the int8 matmul's own fp16 copy of down_proj's input, 2 * 16
    assert memplan.layer_saved_bytes(TINY, Setup(rank=2, method="lora8")) == 252 + 32
    checkpointed = memplan.activation_bytes_per_token(TINY, Setup(rank=2, checkpoint_layers=2))
    assert checkpointed == 2 * (2 * 8) + (2 * 2 * 4 + 8) + (2 * 8 + 4)  # two layer inputs, rope+ids, final norm


def test_weights_match_what_the_peers_measured_on_the_h200():
    """torch.cuda.memory_allocated after the peer loaded Llama-3.1-8B on the H200, as recorded in
    benchmarks/results/train-h200-run1.jsonl (weights_gib, to 0.01 GiB)."""
    from conftest import ROOT
    lines = [json.loads(line) for line in (ROOT / "benchmarks/results/train-h200-run1.jsonl").read_text().splitlines()]
    measured = {line["rung"]: line["weights_gib"] for line in lines if line.get("bench") == "peer"}
    assert memplan.weight_bytes(LLAMA_31_8B, Setup()) / memplan.GIB == pytest.approx(measured["lora"], abs=0.01)
    assert memplan.weight_bytes(LLAMA_31_8B, Setup(method="qlora")) / memplan.GIB == pytest.approx(measured["qlora"], abs=0.02)


def saved_bytes_per_token(model, tokens: int) -> float:
    """What autograd keeps for backward, counted by its own saved-tensor hooks (each storage once)."""
    storages, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(storages.values())


def test_activation_formula_equals_autograds_count_on_the_plain_path():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from loraflow import fastpath
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    fastpath.keep_adapter_inputs_in_compute_dtype(model)
    model.train()
    # the slope over token counts cancels what does not grow with tokens
    measured = (saved_bytes_per_token(model, 256) - saved_bytes_per_token(model, 128)) / 128
    s = Setup(rank=8, fused=False, act_bytes=2)
    arch = Arch.from_config(config)
    predicted = memplan.activation_bytes_per_token(arch, s) + 4 * arch.vocab  # + the fp32 log-probs the loss keeps
    assert predicted == pytest.approx(measured, rel=0.01)


QWEN25_7B = Arch(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064, tied=False)


def test_backward_peak_is_the_larger_phase_not_their_sum():
    """With some layers kept, backward meets them first (all activations, no recompute), and frees them
    before the first recompute; with none or all checkpointed there is one phase."""
    from loraflow.memplan.estimate import backward_phases, layer_saved_bytes
    s = Setup(tokens=8192, checkpoint_layers=26)
    acts, working = backward_phases(QWEN25_7B, s)
    layer = layer_saved_bytes(QWEN25_7B, s) * s.tokens
    every = memplan.activation_bytes_per_token(QWEN25_7B, s) * s.tokens
    kept_phase, recompute_phase = every + memplan.working_bytes(QWEN25_7B, s) - layer, every - 2 * layer + memplan.working_bytes(QWEN25_7B, s)
    assert acts + working == max(kept_phase, recompute_phase) < every + memplan.working_bytes(QWEN25_7B, s)
    for k in (0, 28):
        s = Setup(tokens=8192, checkpoint_layers=k)
        assert backward_phases(QWEN25_7B, s) == (memplan.activation_bytes_per_token(QWEN25_7B, s) * s.tokens,
                                                 memplan.working_bytes(QWEN25_7B, s))


@pytest.mark.parametrize("run", ["train-h200-run9-p1-p2.jsonl", "train-h200-run10-unsloth.jsonl",
                                 "train-h200-run11-unsloth.jsonl", "train-h200-run14.jsonl",
                                 "train-h100-run16.jsonl", "train-h100-run17.jsonl", "train-h100-run23.jsonl",
                                 "train-h100-run25.jsonl"])
def test_plan_against_the_measured_peaks_with_layers_kept(run):
    """Every H200 and H100 run of ours with some layers checkpointed and some kept (T2, T4, P2; run 17
    with up_proj outputs stashed; runs 23 and 25 with the flat 8-bit AdamW's staging in the plan): the
    estimate never under the measured peak, and within 10% of it."""
    from conftest import ROOT
    lines = [json.loads(line) for line in (ROOT / "benchmarks/results" / run).read_text().splitlines() if line.startswith("{")]
    checked = 0
    for d in lines:
        if d.get("bench") != "ours" or not d.get("checkpoint_layers") or "measured_peak_gib" not in d:
            continue
        arch = QWEN25_7B if d.get("workload") == "T4" else LLAMA_31_8B
        if d["checkpoint_layers"] == arch.layers:
            continue
        # T3 runs 8-bit AdamW (benchmarks/train_bench.sh); lines before run 18 do not name the optimizer
        optimizer = d.get("optimizer", "adamw_8bit" if d.get("workload") == "T3" else "adamw")
        s = Setup(method=d["method"], tokens=d["seq"] * d["micro_batch"], checkpoint_layers=d["checkpoint_layers"],
                  optimizer=optimizer,
                  embedding_on_cpu=bool(d.get("embedding_on_cpu")), offload_checkpoints=bool(d.get("offload_checkpoints")),
                  stashed_outputs=d.get("stashed_outputs", 0))
        predicted = memplan.estimate(arch, s)["peak"] / memplan.GIB
        assert d["measured_peak_gib"] <= predicted <= 1.10 * d["measured_peak_gib"], (d.get("workload"), predicted, d["measured_peak_gib"])
        checked += 1
    assert checked


def test_plan_picks_the_fastest_setting_that_fits_a_small_budget():
    base = Setup(rank=16)
    unlimited = memplan.make_plan(LLAMA_31_8B, base, 2048, 8, None)
    assert (unlimited.chosen.setup.checkpoint_layers, unlimited.chosen.micro_batch) == (0, 8)
    plan = memplan.make_plan(LLAMA_31_8B, base, 2048, 8, 24 * memplan.GIB)
    c = plan.chosen
    assert c.fits and c.peak <= 24 * memplan.GIB * (1 - memplan.SAFETY_MARGIN)
    assert 0 < c.setup.checkpoint_layers < 32, "24 GiB needs some, not all, layers checkpointed"
    cost = memplan.relative_step_cost(LLAMA_31_8B, c.setup)
    # nothing predicted faster fits, and with this micro-batch one layer fewer checkpointed would not fit
    assert all(not x.fits for x in plan.considered if memplan.relative_step_cost(LLAMA_31_8B, x.setup) < cost)
    assert not any(x.fits for x in plan.considered
                   if x.micro_batch == c.micro_batch and x.setup.checkpoint_layers == c.setup.checkpoint_layers - 1)


def test_auto_method_falls_to_qlora_and_a_hopeless_budget_names_the_next_rung():
    params = TrainParams(method="auto", rows_per_step=1, rank=16, target_modules="all-linear")
    # 9 GiB: lora8 needs 9.0 at best (its checkpointed inputs offloaded), more than the 8.1 usable
    plan = planning.plan_for_params(params, LLAMA_31_8B, 2048, act_bytes=2, fused=True, gpu_free_bytes=9 * memplan.GIB)
    assert plan.chosen.fits and plan.chosen.setup.method == "qlora"
    tight = TrainParams(method="lora", rows_per_step=1, memory_budget_gib=12)
    plan = planning.plan_for_params(tight, LLAMA_31_8B, 2048, act_bytes=2, fused=True, gpu_free_bytes=None)
    assert not plan.chosen.fits and memplan.next_rung_down(plan) == "train.method: lora8"


def test_offloaded_checkpoints_let_a_larger_micro_batch_fit_and_leave_the_gpu():
    """T3's budget (8B QLoRA, 8 x 2048 rows, 8 GiB): with the checkpointed inputs in CPU memory the plan
    fits micro-batch 4 where it fits 2 without; the inputs (8 KB a token and layer) leave the
    activations, two of them join the working set; pinned off, the plan does without."""
    auto = TrainParams(method="qlora", rows_per_step=8, memory_budget_gib=8, optimizer="adamw_8bit")
    plan = planning.plan_for_params(auto, LLAMA_31_8B, 2048, act_bytes=2, fused=True, gpu_free_bytes=None)
    off = planning.plan_for_params(auto.model_copy(update={"offload_checkpoints": False}), LLAMA_31_8B, 2048,
                                   act_bytes=2, fused=True, gpu_free_bytes=None)
    assert plan.chosen.fits and off.chosen.fits
    assert plan.chosen.setup.offload_checkpoints and plan.chosen.micro_batch == 4
    assert not off.chosen.setup.offload_checkpoints and off.chosen.micro_batch == 2
    s = plan.chosen.setup
    kept = replace(s, offload_checkpoints=False)
    inputs = s.checkpoint_layers * 2 * 4096 * s.tokens
    assert memplan.estimate(LLAMA_31_8B, kept)["activations"] - plan.chosen.parts["activations"] == inputs
    assert plan.chosen.parts["working_set"] - memplan.estimate(LLAMA_31_8B, kept)["working_set"] == 2 * 2 * 4096 * s.tokens
    # no budget (CPU) or several GPUs: never offloaded, and asking for it under FSDP is an error
    cpu = planning.plan_for_params(auto.model_copy(update={"memory_budget_gib": None}), LLAMA_31_8B, 2048,
                                   act_bytes=2, fused=True, gpu_free_bytes=None)
    assert not cpu.chosen.setup.offload_checkpoints
    sharded = planning.plan_for_params(auto, LLAMA_31_8B, 2048, act_bytes=2, fused=True, gpu_free_bytes=None,
                                       processes=2, shards=2)
    assert not any(c.setup.offload_checkpoints for c in sharded.considered)
    with pytest.raises(LoraflowError, match="offload_checkpoints=true is for one GPU"):
        planning.plan_for_params(auto.model_copy(update={"offload_checkpoints": True}), LLAMA_31_8B, 2048,
                                 act_bytes=2, fused=True, gpu_free_bytes=None, processes=2, shards=2)


def test_stashed_up_outputs_as_many_as_the_copies_keep_pace_with_and_only_where_they_fit():
    """The forward's GPU-to-host copies (input plus up_proj output per token and layer, at the link's
    one-way rate) against the layer's forward time: at 8B the link carries every layer's up output, at
    the Qwen2.5-7B shape (wider MLP, narrower hidden) not all. The fetched-ahead output joins the
    working set, the recompute drops up_proj's FLOPs from the step cost, and the plan adds stashing to
    its choice only where that still fits."""
    def by_hand(arch, layers):
        forward = memplan.LAYER_FORWARD_OVER_PROJECTIONS * 2 * arch.linear_params() / arch.layers / memplan.MATMUL_FLOP_PER_S
        copy_input, copy_up = (2 * width / memplan.HOST_COPY_BYTES_PER_S for width in (arch.hidden, arch.intermediate))
        return int(layers * min(1.0, (forward - copy_input) / copy_up))
    s = Setup(tokens=16384, checkpoint_layers=31, offload_checkpoints=True)
    n = memplan.stashed_output_layers(LLAMA_31_8B, s)
    assert n == by_hand(LLAMA_31_8B, 31) == 31
    qwen = memplan.stashed_output_layers(QWEN25_7B, replace(s, checkpoint_layers=27))
    assert 0 < qwen == by_hand(QWEN25_7B, 27) < 27
    for off in (replace(s, offload_checkpoints=False), replace(s, method="lora8"), replace(s, fused=False),
                replace(s, targets=("q_proj", "v_proj")), replace(s, shards=2)):
        assert memplan.stashed_output_layers(LLAMA_31_8B, off) == 0
    stashed = replace(s, stashed_outputs=n)
    assert memplan.working_bytes(LLAMA_31_8B, stashed) - memplan.working_bytes(LLAMA_31_8B, s) == 2 * 14336 * 16384
    assert memplan.projection_share(LLAMA_31_8B, "up_proj") == pytest.approx(4096 * 14336 / (LLAMA_31_8B.linear_params() / 32))
    assert memplan.relative_step_cost(LLAMA_31_8B, stashed) < memplan.relative_step_cost(LLAMA_31_8B, s)
    # T2 (24 GiB) stashes on top of the setting it would pick anyway; T3's 8 GiB has no room for the
    # fetched-ahead output at micro-batch 4, and the plan keeps micro-batch 4 rather than trade it
    t2 = memplan.make_plan(LLAMA_31_8B, Setup(), 2048, 8, 24 * memplan.GIB, place_checkpoints=True)
    assert t2.chosen.setup.stashed_outputs == memplan.stashed_output_layers(LLAMA_31_8B, t2.chosen.setup) > 0
    assert t2.chosen.peak == memplan.estimate(LLAMA_31_8B, t2.chosen.setup)["peak"] <= 24 * memplan.GIB * 0.9
    assert t2.to_dict()["stashed_outputs"] == t2.chosen.setup.stashed_outputs
    assert "up_proj outputs too" in memplan.render(t2)
    t3 = memplan.make_plan(LLAMA_31_8B, Setup(method="qlora", optimizer="adamw_8bit"), 2048, 8, 8 * memplan.GIB,
                           place_embedding=True, place_checkpoints=True)
    assert t3.chosen.micro_batch == 4 and t3.chosen.setup.stashed_outputs == 0
    assert memplan.estimate(LLAMA_31_8B, replace(t3.chosen.setup, stashed_outputs=1))["peak"] > 8 * memplan.GIB * 0.9


def test_train_stage_refuses_a_plan_that_does_not_fit_before_loading_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SimpleNamespace(num_attention_heads=32, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
    params = TrainParams(method="lora", rows_per_step=4, memory_budget_gib=16)
    plan = planning.make_plan(params, config, 2048, planning.Speed(packing=True, fused=True), torch.bfloat16)
    with pytest.raises(LoraflowError, match="does not fit.*Next rung down: train.method: lora8"):
        planning.write_plan(plan)
    written = json.loads((tmp_path / "reports/memory_plan.json").read_text())
    assert written["fits"] is False and written["budget_gib"] == 16.0
    table = (tmp_path / "reports/memory_plan.md").read_text()
    # the smallest setting it holds has the embedding in CPU memory: 14.96 GiB less 0.98
    assert re.search(r"\| weights \| 13\.9\d+ \|", table) and "input embedding in CPU memory" in table


def test_micro_batch_must_divide_the_rows_of_a_step():
    with pytest.raises(LoraflowError, match="must divide"):
        planning.plan_for_params(TrainParams(rows_per_step=16, micro_batch=3), TINY, 64, 2, True, None)


def test_loraflow_plan_command_prints_writes_and_refuses(tmp_path):
    """`loraflow plan` on its own: the real config of Llama-3.1-8B (no weights needed), this project's params."""
    import shutil
    import subprocess
    from conftest import BIN, ROOT
    # with --model the plan is for that model alone: no chat tokens of this project's run beside the adapter
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    model = str(ROOT / "benchmarks/configs/llama-3.1-8b")
    run = lambda *a: subprocess.run([str(BIN / "loraflow"), "plan", "--model", model, "--seq", "2048", "--batch", "8", *a],
                                    cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    ok = run("--budget-gib", "80")
    assert ok.returncode == 0, ok.stderr
    assert "| weights | 14.95" in ok.stdout and ": fits;" in ok.stdout
    written = json.loads((tmp_path / "reports/memory_plan_preview.json").read_text())
    assert written["fits"] and written["predicted_gib"]["peak"] <= 80 * (1 - memplan.SAFETY_MARGIN)
    hopeless = run("--budget-gib", "4")
    assert hopeless.returncode == 2 and "Next rung down" in hopeless.stderr and "Traceback" not in hopeless.stderr
    auto = run("--budget-gib", "12", "--method", "auto")
    assert auto.returncode == 0 and "method lora8" in auto.stdout and ": fits;" in auto.stdout  # lora is 16.7 GiB at best


def test_generation_batch_by_hand():
    # KV cache: 2 layers * (k, v) * 1 kv head * 4 dims * (20 + 12) positions * 2 bytes = 1024 bytes a row
    # prefill: 20 tokens * (3*16 + 4*8) * 2 = 3200 a row; last-position logits: 10 * 4 * 2 = 80 a row
    assert memplan.generation_bytes(TINY, 1, [20], 12) == 1024 + 3200 + 80
    per_row = 1024 + 3200 + 80
    free = 8 * per_row / (1 - memplan.SAFETY_MARGIN)
    assert memplan.generation_batch(TINY, [20] * 100, 12, free) == 8
    assert memplan.generation_batch(TINY, [20] * 5, 12, free) == 4   # no bigger than the rows need
    assert memplan.generation_batch(TINY, [20] * 2000, 12, free * 1000) == 512  # capped


def test_ragged_cache_holds_each_row_by_its_own_length():
    # the batch-invariant loop's cache: each row its own prompt plus the new tokens; HF generate pads
    # each batch to its longest. Rows 4 and 20 long, 12 new tokens, batch 2: 16 + 32 against 2 * 32
    assert memplan.cache_slots([20, 4], 2, 12) == 48
    assert memplan.cache_slots([20, 4], 2, 12, ragged=False) == 64
    per_position = 2 * 2 * 1 * 4 * 2
    prefill, logits = 24 * (3 * 16 + 4 * 8) * 2, 2 * 10 * 4 * 2
    assert memplan.generation_bytes(TINY, 2, [20, 4], 12) == 48 * per_position + prefill + logits
    assert memplan.generation_bytes(TINY, 2, [20, 4], 12, ragged=False) == 64 * per_position + prefill + logits
    # batches run sorted, a short last batch filled with copies of its last row: [3, 5], [9, 9 (copy)]
    assert memplan.cache_slots([9, 3, 5], 2, 1) == 18 + 2
    # one long prompt among short ones: the largest batch's sum, not every row at the longest
    lengths = [100] * 511 + [4000]
    assert memplan.cache_slots(lengths, 512, 256) == 511 * 100 + 4000 + 512 * 256
    assert memplan.cache_slots(lengths, 512, 256, ragged=False) == 512 * (4000 + 256)


def test_running_out_of_memory_anyway_names_the_next_rung():
    from loraflow import training

    class OutOfMemoryTrainer:
        def train(self, resume_from_checkpoint=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    plan = memplan.make_plan(LLAMA_31_8B, Setup(), 2048, 8, 40 * memplan.GIB)
    assert plan.chosen.setup.checkpoint_layers < 32
    # the cheapest rung first: the embedding to CPU memory costs a copy a micro-batch, not a recomputation
    with pytest.raises(LoraflowError, match=r"out of GPU memory .* Next rung down: the input embedding in CPU memory"):
        training.train_or_name_next_rung(OutOfMemoryTrainer(), plan, resume=False)
    plan = memplan.make_plan(LLAMA_31_8B, Setup(embedding_on_cpu=True), 2048, 8, 40 * memplan.GIB)
    with pytest.raises(LoraflowError, match=r"out of GPU memory .* Next rung down: checkpoint more layers"):
        training.train_or_name_next_rung(OutOfMemoryTrainer(), plan, resume=False)


def test_fused_layer_kernels_only_for_large_micro_batches():
    """Below FUSED_LAYERS_MIN_TOKENS the plan leaves Liger's per-layer kernels off (host-bound there)
    and counts the plain modules' activations; the fused cross-entropy stays."""
    small = memplan.make_plan(LLAMA_31_8B, Setup(), 2048, 1, None).chosen.setup
    large = memplan.make_plan(LLAMA_31_8B, Setup(), 2048, 4, None).chosen.setup
    assert small.fused and not small.fused_layers and large.fused_layers
    assert memplan.layer_saved_bytes(LLAMA_31_8B, small) == memplan.layer_saved_bytes(LLAMA_31_8B, replace(small, fused=False))
    assert memplan.loss_bytes_per_token(LLAMA_31_8B, small) == 2 * 4096  # still the fused loss


def test_embedding_in_cpu_memory_by_hand():
    # the 10 x 8 input embedding leaves the GPU; the head and norms stay
    on_cpu = memplan.weight_bytes(TINY, Setup(rank=2, embedding_on_cpu=True))
    assert on_cpu == memplan.weight_bytes(TINY, Setup(rank=2)) - 10 * 8 * 2
    assert memplan.weight_bytes(LLAMA_31_8B, Setup(method="qlora", embedding_on_cpu=True)) / memplan.GIB == pytest.approx(5.32 - 0.98, abs=0.02)


def test_plan_moves_the_embedding_to_cpu_only_when_that_lets_a_faster_setting_fit():
    """8B QLoRA in 8 GiB: with the embedding on the GPU only micro-batch 1 fits; with it in CPU memory,
    micro-batch 2. Given room, or a tied head, the embedding stays on the GPU. (Checkpointed inputs stay on
    the GPU here; offloading them is the other test's subject.)"""
    qlora = TrainParams(method="qlora", rows_per_step=8, optimizer="adamw_8bit", memory_budget_gib=8,
                        offload_checkpoints=False)
    tight = planning.plan_for_params(qlora, LLAMA_31_8B, 2048, 2, True, None).chosen
    assert tight.fits and tight.setup.embedding_on_cpu and tight.micro_batch == 2
    kept = planning.plan_for_params(qlora.model_copy(update={"embedding_on_cpu": False}), LLAMA_31_8B, 2048, 2, True, None).chosen
    assert kept.fits and not kept.setup.embedding_on_cpu and kept.micro_batch == 1
    assert memplan.relative_step_cost(LLAMA_31_8B, tight.setup) < memplan.relative_step_cost(LLAMA_31_8B, kept.setup)
    roomy = planning.plan_for_params(qlora.model_copy(update={"memory_budget_gib": 40}), LLAMA_31_8B, 2048, 2, True, None)
    assert not roomy.chosen.setup.embedding_on_cpu
    # P2 (LoRA in 24 GiB): the freed GiB would spare one recomputed layer, which does not pay for the copy
    p2 = planning.plan_for_params(TrainParams(method="lora", rows_per_step=8, memory_budget_gib=24, offload_checkpoints=False),
                                  LLAMA_31_8B, 2048, 2, True, None)
    assert not p2.chosen.setup.embedding_on_cpu and p2.chosen.setup.checkpoint_layers == 30
    assert any(c.fits and c.setup.embedding_on_cpu and c.setup.checkpoint_layers == 29 for c in p2.considered)
    tied = replace(LLAMA_31_8B, tied=True)
    assert not any(c.setup.embedding_on_cpu for c in planning.plan_for_params(qlora, tied, 2048, 2, True, None).considered)
    with pytest.raises(LoraflowError, match="embedding_on_cpu=true needs"):
        planning.plan_for_params(qlora.model_copy(update={"embedding_on_cpu": True}), tied, 2048, 2, True, None)
    adapted = qlora.model_copy(update={"target_modules": ["q_proj", "embed_tokens"]})
    assert not any(c.setup.embedding_on_cpu for c in planning.plan_for_params(adapted, LLAMA_31_8B, 2048, 2, True, None).considered)
    no_room = memplan.make_plan(LLAMA_31_8B, Setup(method="qlora"), 2048, 1, 5 * memplan.GIB)
    assert memplan.next_rung_down(no_room) == "the input embedding in CPU memory (train.embedding_on_cpu: true)"


def test_trained_token_rows_by_hand():
    """Rows of the embedding and the head trained beside the adapter (a base's chat tokens): their own
    weights, grads and moments, and the whole matrices PEFT's index_copy and autograd's dense
    gradients make for the step; the embedding then can no longer leave the GPU."""
    plain = memplan.Setup(tokens=64, act_bytes=2)
    rows = replace(plain, trainable_tokens=4)
    a, h, v = 2, TINY.hidden, TINY.vocab
    assert memplan.adapter_bytes(TINY, rows) - memplan.adapter_bytes(TINY, plain) == 4 * h * 2 * (2 * a + 2 * a)
    parts = memplan.estimate(TINY, rows)
    assert "token_rows" not in memplan.estimate(TINY, plain) and parts["token_rows"] == 3 * v * h * a
    tied = replace(TINY, tied=True)
    assert memplan.estimate(tied, rows)["token_rows"] == 2 * v * h * a
    assert memplan.embedding_can_leave_gpu(TINY, plain) and not memplan.embedding_can_leave_gpu(TINY, rows)
    # the head's input is kept for its gradient; the first layer's norm keeps its input too
    extra = memplan.activation_bytes_per_token(TINY, rows) - memplan.activation_bytes_per_token(TINY, plain)
    assert extra == a * h + memplan.norm_saved_bytes(TINY, rows)


def test_offloaded_recomputes_leave_down_proj_out_unless_a_norm_reads_it():
    """Every offloaded checkpointed layer skips down_proj in its recompute (offload.unread_outputs), which
    the step cost counts; not where a norm reads the MLP's output (Gemma 2 and 3, from the config's model
    type), nor without the fused offloaded path."""
    s = Setup(tokens=16384, checkpoint_layers=31, offload_checkpoints=True)
    assert memplan.unread_down_layers(LLAMA_31_8B, s) == 31
    t2 = memplan.make_plan(LLAMA_31_8B, Setup(), 2048, 8, 24 * memplan.GIB, place_checkpoints=True)
    assert t2.to_dict()["unread_down_layers"] == t2.chosen.setup.checkpoint_layers > 0
    assert f"down_proj left out of {t2.chosen.setup.checkpoint_layers} recomputes" in memplan.render(t2)
    normed = replace(LLAMA_31_8B, mlp_output_normed=True)
    for arch, off in ((normed, s), (LLAMA_31_8B, replace(s, offload_checkpoints=False)),
                      (LLAMA_31_8B, replace(s, method="lora8")), (LLAMA_31_8B, replace(s, targets=("q_proj", "v_proj")))):
        assert memplan.unread_down_layers(arch, off) == 0
    down = memplan.projection_share(LLAMA_31_8B, "down_proj")
    assert memplan.relative_step_cost(normed, s) - memplan.relative_step_cost(LLAMA_31_8B, s) == pytest.approx(
        2 * 31 * down / 32 / 4 * (1 + memplan.OFFLOAD_CHECKPOINTS_COST) * (16384 + memplan.OCCUPANCY_TOKENS) / 16384)
    config = dict(num_attention_heads=8, hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=100)
    assert Arch.from_config(SimpleNamespace(model_type="gemma2", **config)).mlp_output_normed
    assert not Arch.from_config(SimpleNamespace(model_type="llama", **config)).mlp_output_normed


def test_the_8bit_optimizer_steps_staging_is_planned_after_backward():
    """FlatAdamW8bit stages parameters and gradients (fp32, up to FLAT_8BIT_STAGING_VALUES each)
    inside the optimizer step, when backward's tensors are gone: the plan's peak is the larger of
    backward's and the step's."""
    tiny = Setup(rank=2, optimizer="adamw_8bit", tokens=1)
    step = memplan.weight_bytes(TINY, tiny) + memplan.adapter_bytes(TINY, tiny) + 2 * 4 * 512
    assert memplan.optimizer_step_bytes(TINY, tiny) == step
    assert memplan.estimate(TINY, tiny)["peak"] == step  # one token: the step holds more than backward
    no_staging = replace(tiny, optimizer="adamw")
    assert memplan.optimizer_step_bytes(TINY, no_staging) == \
        memplan.weight_bytes(TINY, no_staging) + memplan.adapter_bytes(TINY, no_staging)
    assert memplan.optimizer_step_bytes(TINY, replace(tiny, shards=2)) == pytest.approx(
        memplan.weight_bytes(TINY, replace(tiny, shards=2)) + memplan.adapter_bytes(TINY, replace(tiny, shards=2)))
    t3 = Setup(method="qlora", optimizer="adamw_8bit", tokens=4 * 2048, checkpoint_layers=32, embedding_on_cpu=True,
               offload_checkpoints=True)
    parts = memplan.estimate(LLAMA_31_8B, t3)
    assert memplan.optimizer_step_bytes(LLAMA_31_8B, t3) - memplan.weight_bytes(LLAMA_31_8B, t3) \
        - memplan.adapter_bytes(LLAMA_31_8B, t3) == 2 * 4 * memplan.FLAT_8BIT_STAGING_VALUES  # 32 MiB
    assert parts["peak"] == sum(v for k, v in parts.items() if k != "peak")  # backward sets T3's peak
