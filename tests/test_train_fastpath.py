"""The train stage's fast path changes speed and memory, not the math: on the same data and seed,
packed micro-batches with some layers checkpointed give the plain path's loss curve and adapter."""
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, edit_params, make_tiny, make_workspace, read_json, sh

pytestmark = pytest.mark.slow
DVC = str(BIN / "dvc")
LOSS_RTOL = 1e-4   # fp32 on CPU: packing and micro-batching only reorder sums
# After 20 AdamW steps the reordered sums leave the adapter 1.6e-5 from the plain path's at most (an AMD
# EPYC, 2026-12-06; an Intel Xeon stayed under 1e-5), while a learning rate 1% off moves every tensor by
# 3.9e-4 or more: this bound sits between the two
ADAPTER_ATOL = 5e-5


def train(ws, **settings):
    edit_params(ws, train=settings)
    sh([DVC, "repro", "--single-item", "train"], ws)
    return (pd.read_csv(ws / "reports/train_loss.csv"), load_file(str(ws / "models/adapter/adapter_model.safetensors")),
            read_json(ws, "reports/stages/train.json"), read_json(ws, "reports/memory_plan.json"))


def test_packed_micro_batched_checkpointed_training_matches_the_plain_path(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    make_tiny(ws)
    # no token rows trained: the fast side keeps the (then frozen) input embedding in CPU memory
    # 16 rows a step: the fast side takes them as 4 micro-batches of 4
    edit_params(ws, train={"dropout": 0.0, "trainable_tokens": [], "rows_per_step": 16})
    sh([DVC, "repro", "tokenize"], ws)
    plain_loss, plain_adapter, plain_info, plain_plan = train(ws, packing=False, gradient_checkpointing=False, micro_batch="auto")
    fast_loss, fast_adapter, fast_info, fast_plan = train(ws, packing=True, gradient_checkpointing=1, micro_batch=4,
                                                          embedding_on_cpu=True)

    assert (plain_plan["micro_batch"], plain_plan["checkpoint_layers"]) == (16, 0)  # CPU, no budget: the fastest
    assert (fast_info["micro_batch"], fast_info["checkpoint_layers"], fast_info["packing"]) == (4, 1, True)
    assert fast_plan["grad_accum"] == 4 and fast_info["steps"] == plain_info["steps"] == 20
    assert fast_plan["embedding_on_cpu"] and not plain_plan["embedding_on_cpu"]
    assert fast_info["total_parameters"] == plain_info["total_parameters"]
    assert len(plain_loss) == len(fast_loss) > 0
    for a, b in zip(plain_loss["loss"], fast_loss["loss"]):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    assert plain_adapter.keys() == fast_adapter.keys()
    for name, tensor in plain_adapter.items():
        torch.testing.assert_close(fast_adapter[name], tensor, rtol=0, atol=ADAPTER_ATOL, msg=lambda m: f"{name}: {m}")


def test_the_fused_loss_reads_a_head_weight_that_carries_the_trained_token_rows():
    """Liger's fused linear cross-entropy (the GPU path) takes `lm_head.weight` instead of calling the
    head. With token rows trained, PEFT must answer that attribute with the weight that holds the
    trained rows and passes their gradient on, or the fused path would train the rows with no loss."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow.params import TrainParams
    from loraflow.training import lora_config, token_indices_by_module
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    peft = get_peft_model(model, lora_config(TrainParams(), token_indices_by_module(model, [5, 7])))
    head = peft.base_model.model.lm_head
    rows = head.token_adapter.trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.add_(1.0)
    weight = head.weight
    assert torch.equal(weight[[5, 7]], rows) and weight.requires_grad
    (weight.sum() * 2).backward()
    assert torch.equal(rows.grad, torch.full_like(rows, 2.0))


def test_the_tokens_seen_are_counted_on_the_host_as_the_trainer_counts_them(tmp_path):
    """host_counting's token and FLOP counts equal the Trainer's own for the same batches, without the
    Trainer's trip through the device (a gather and an .item() every micro-batch) and with one walk
    over the parameters instead of one a batch."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from loraflow import fastpath
    from loraflow.training import host_counting
    if not hasattr(Trainer, "_track_num_input_tokens"):
        pytest.skip("this transformers counts tokens elsewhere; host_counting leaves it as it is")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    args = TrainingArguments(output_dir=str(tmp_path), include_num_input_tokens_seen=True, use_cpu=True, report_to="none")
    ours, theirs = host_counting(Trainer)(model=model, args=args), Trainer(model=model, args=args)

    def no_device_round_trip(*a, **k):
        raise AssertionError("counted through the device")
    ours.accelerator.gather = no_device_round_trip
    collate = fastpath.packed_collator(0)
    walks = []
    counted = model.num_parameters
    model.num_parameters = lambda *a, **k: walks.append(1) or counted(*a, **k)
    for lengths in ((5, 3), (7,), (2, 2, 9)):
        batch = collate([{"input_ids": list(range(n)), "labels": list(range(n))} for n in lengths])
        ours._track_num_input_tokens(batch)
        theirs._track_num_input_tokens(batch)
        assert ours.state.num_input_tokens_seen == theirs.state.num_input_tokens_seen
        assert ours.floating_point_ops(batch) == theirs.floating_point_ops(batch) > 0
    assert ours.state.num_input_tokens_seen == 5 + 3 + 7 + 2 + 2 + 9
    assert len(walks) == 1 + 3  # ours walked the parameters once, the Trainer's own at every batch
