"""Padding-free packing (loraflow/fastpath.py): on the tiny model, a packed micro-batch gives the
loss and the LoRA gradients of the same rows padded, and checkpointing some layers changes nothing."""
import pytest
import torch

from loraflow import fastpath
from loraflow.masking import IGNORE_INDEX
from loraflow.training import pad_collator

ROWS = [  # three rows of different lengths; the first label of each is a prompt token (-100)
    {"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [IGNORE_INDEX] * 4 + [9, 10, 11]},
    {"input_ids": [12, 13, 14], "labels": [IGNORE_INDEX, 13, 14]},
    {"input_ids": [20, 21, 22, 23, 24], "labels": [IGNORE_INDEX] * 2 + [22, 23, 24]},
]


def lora_model(model_dir, attn, checkpointed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                             init_lora_weights=False))  # B != 0, so every LoRA grad is non-trivial
    fastpath.checkpoint_layers(model, checkpointed)
    model.train()
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_collator_restarts_positions_and_masks_each_rows_first_label():
    batch = fastpath.packed_collator(0)(ROWS)
    assert batch["input_ids"].shape == (1, 15)
    assert batch["position_ids"].tolist() == [list(range(7)) + list(range(3)) + list(range(5))]
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 10, 15] and batch["max_length_q"] == 7
    labels = batch["labels"][0].tolist()
    assert [labels[i] for i in (0, 7, 10)] == [IGNORE_INDEX] * 3
    assert sum(x != IGNORE_INDEX for x in labels) == 8


@pytest.mark.parametrize("checkpointed", [0, 1])
def test_packed_batch_gives_the_padded_batchs_loss_and_gradients(tiny_model_dir, checkpointed):
    padded = lora_model(tiny_model_dir, "sdpa")
    packed = lora_model(tiny_model_dir, fastpath.register_packed_attention(), checkpointed)
    loss_a, grads_a = loss_and_grads(padded, pad_collator(0)(ROWS))
    loss_b, grads_b = loss_and_grads(packed, fastpath.packed_collator(0)(ROWS))
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def head_rows(model) -> list[int]:
    """The number of rows each call of the model's output head gets."""
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
    return rows


@pytest.mark.parametrize("checkpointed", [0, 1])
def test_the_head_runs_on_the_trained_positions_alone_and_changes_no_gradient(tiny_model_dir, checkpointed):
    """With trained_logits_only the head sees the 8 positions whose next token is trained, not all 15,
    and the loss and every LoRA gradient are those of the whole packed batch."""
    model = lora_model(tiny_model_dir, fastpath.register_packed_attention(), checkpointed)
    assert fastpath.takes_kept_logits(model)
    rows = head_rows(model)
    whole = fastpath.packed_collator(0)(ROWS)
    kept = fastpath.packed_collator(0, trained_logits_only=True)(ROWS)
    loss_a, grads_a = loss_and_grads(model, whole)
    loss_b, grads_b = loss_and_grads(model, kept)
    assert rows == [15, 8]
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_kept_positions_are_those_whose_next_token_is_trained():
    batch = fastpath.packed_collator(0, trained_logits_only=True)(ROWS)
    labels = batch["labels"][0]
    assert batch["logits_to_keep"].tolist() == [3, 4, 5, 7, 8, 11, 12, 13]
    assert batch["shift_labels"][0].tolist() == labels[batch["logits_to_keep"] + 1].tolist() == [9, 10, 11, 13, 14, 22, 23, 24]
    # too few positions to leave out for the gather to pay (1 of 32 is the least), or none trained: nothing added
    one_row = [IGNORE_INDEX] + list(range(1, 33))  # 33 positions, the last with no next token
    assert fastpath.kept_logits(torch.tensor(one_row)) == {}
    assert fastpath.kept_logits(torch.tensor(one_row[:32])) != {}
    assert fastpath.kept_logits(torch.full((4,), IGNORE_INDEX)) == {}


def test_the_trainer_normalizes_kept_batches_by_the_same_token_count(tmp_path):
    """Under gradient accumulation the Trainer divides the summed loss by the trained tokens of the
    whole step, which it counts from shift_labels when a batch has them: the same count as from labels."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    counts = []
    for only in (False, True):
        collate = fastpath.packed_collator(0, trained_logits_only=only)
        batches = [collate(ROWS), collate(ROWS[1:])]
        counts.append(int(trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))[1]))
    assert counts == [13, 13]


def test_a_forward_without_logits_to_keep_is_not_given_kept_logits():
    class Old(torch.nn.Module):
        def forward(self, input_ids, labels=None, **kwargs):
            return input_ids
    assert not fastpath.takes_kept_logits(Old())


def test_rows_cannot_see_each_other(tiny_model_dir):
    """Changing the first row must not change the loss terms of the rows packed after it."""
    model = lora_model(tiny_model_dir, fastpath.register_packed_attention()).eval()
    collate = fastpath.packed_collator(0)
    other = [{"input_ids": [30, 31, 32, 33, 34, 35, 36], "labels": ROWS[0]["labels"]}] + ROWS[1:]
    with torch.no_grad():
        a = model(**{k: v for k, v in collate(ROWS).items() if k != "labels"}).logits[0, 7:]
        b = model(**{k: v for k, v in collate(other).items() if k != "labels"}).logits[0, 7:]
    torch.testing.assert_close(a, b)


def test_equal_rows_run_as_one_dense_batch_with_the_per_row_result():
    """The GPU's cuDNN path views a packed micro-batch of equal rows as a dense (rows, heads, L, d)
    batch with grouped KV heads; the same view through SDPA's math kernel (CPU) must give the packed
    path's output and gradients, row by row, and a row must not see the row before it."""
    torch.manual_seed(0)
    rows, length, heads, kv, d = 3, 6, 4, 2, 8
    total = rows * length
    q, k, v = (torch.randn(1, h, total, d, dtype=torch.float64, requires_grad=True) for h in (heads, kv, kv))
    cu = torch.arange(0, total + 1, length, dtype=torch.int32)
    packed, _ = fastpath.packed_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=length)
    grads_packed = torch.autograd.grad(packed.square().sum(), (q, k, v))
    dense = fastpath.dense_rows_attention(q, k, v, rows, 0.3, "math")
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    assert dense.shape == packed.shape == (1, total, heads, d)
    torch.testing.assert_close(dense, packed)
    for a, b in zip(grads_dense, grads_packed):
        torch.testing.assert_close(a, b)
    # the second row's first token attends to itself alone, not to the first row
    first = torch.softmax(torch.zeros(1), 0) * v[0, :, length].repeat_interleave(heads // kv, 0)
    torch.testing.assert_close(dense[0, length], first)


def test_the_backend_trial_runs_with_grad_and_outside_a_checkpoints_hooks(monkeypatch):
    """cudnn_takes is first asked from inside a layer's forward: under no_grad (an offloaded checkpoint's
    first pass) or under torch's checkpoint hooks, which count saved tensors. The trial must still
    run its backward, and save nothing through those hooks (the recompute would then miss them).
    On CPU the trial runs SDPA's math kernel in cuDNN's place."""
    monkeypatch.setattr(fastpath, "CUDNN", "math")
    monkeypatch.setattr(fastpath, "_cudnn_verdicts", {})
    q, k = torch.zeros(1, 4, 6, 8), torch.zeros(1, 2, 6, 8)
    packed = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        assert fastpath.cudnn_takes(q, k)
    assert packed == []


def test_checkpointing_picks_exactly_the_first_layers(tiny_model_dir):
    model = lora_model(tiny_model_dir, "sdpa", checkpointed=1)
    assert [layer.gradient_checkpointing for layer in fastpath.decoder_layers(model)] == [True, False]


def test_embedding_in_cpu_memory_stays_there_and_changes_no_gradient(tiny_model_dir):
    """The swapped-in CpuEmbedding is not a registered parameter (so model.to(device) leaves it), and
    with checkpointing (whose input-grad hook sits on the embedding) loss and LoRA grads are unchanged."""
    batch = {k: v for k, v in fastpath.packed_collator(0)(ROWS).items()}
    plain = lora_model(tiny_model_dir, "sdpa", checkpointed=2)
    moved = lora_model(tiny_model_dir, "sdpa")
    fastpath.keep_input_embedding_on_cpu(moved)
    fastpath.checkpoint_layers(moved, 2)
    embedding = moved.get_input_embeddings()
    assert isinstance(embedding, fastpath.CpuEmbedding)
    assert all(p is not embedding.weight for p in moved.parameters())
    moved.to(torch.float64)
    assert embedding.weight.dtype == torch.float32  # left alone by the move
    moved.to(torch.float32)
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(moved, batch)
    assert loss_b == loss_a and grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="trained"):
        trained = lora_model(tiny_model_dir, "sdpa")
        trained.get_input_embeddings().weight.requires_grad_(True)
        fastpath.keep_input_embedding_on_cpu(trained)
