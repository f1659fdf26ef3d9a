"""The flat 8-bit AdamW against bitsandbytes' own class (CPU kernels): the same bytes in every weight
and state, fewer update launches, and checkpoints that load across the two."""
import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from loraflow import flat_adamw8bit  # noqa: E402
from loraflow.flat_adamw8bit import FlatAdamW8bit  # noqa: E402

SHAPES = [
    (16, 512), (1024, 16),   # LoRA A and B: flat
    (16, 768), (512, 16),    # flat
    (4097, 1),               # 8-bit states, not a multiple of 256 values: bitsandbytes' own update
    (8, 64),                 # below min_8bit_size: 32-bit states, bitsandbytes' own update
    (16, 1024), (16, 256),   # flat; the first has no gradient on step 2
]
NO_GRAD_ON_STEP = {6: 2}


def make(cls, seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in SHAPES]
    groups = [{"params": params[:5], "weight_decay": 0.1}, {"params": params[5:], "weight_decay": 0.0}]
    return params, cls(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, optim_bits=8)


def run_steps(params, optimizer, steps, first=1):
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        for i, p in enumerate(params):
            skip = NO_GRAD_ON_STEP.get(i) == step
            p.grad = None if skip else torch.randn(p.shape, generator=g)
        optimizer.step()


def states(params, optimizer):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()} for p in params]


def assert_same(params_a, opt_a, params_b, opt_b):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a, b), f"weight {i} ({tuple(a.shape)}) differs"
    for i, (sa, sb) in enumerate(zip(states(params_a, opt_a), states(params_b, opt_b))):
        assert sa.keys() == sb.keys()
        for k in sa:
            same = torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
            assert same, f"state {k} of weight {i} differs"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of at most 24576 values, so one group's flat tensors take several launches."""
    monkeypatch.setattr(flat_adamw8bit, "CHUNK_VALUES", 24576)


def test_same_bytes_as_bitsandbytes(small_chunks):
    ref_params, ref = make(bnb.optim.AdamW)
    params, flat = make(FlatAdamW8bit)
    run_steps(ref_params, ref, 4)
    run_steps(params, flat, 4)
    assert_same(params, flat, ref_params, ref)
    # the skipped step is kept per tensor, as bitsandbytes keeps it
    assert flat.state[params[6]]["step"] == 3 and flat.state[params[7]]["step"] == 4
    assert flat.state[params[4]]["state1"].dtype == torch.uint8  # the odd size kept 8-bit states
    assert flat.state[params[5]]["state1"].dtype == torch.float32


def test_fewer_launches(small_chunks, monkeypatch):
    calls = []
    real = flat_adamw8bit.F.optimizer_update_8bit_blockwise

    def counted(*args, **kwargs):
        calls.append(args[1].numel())
        return real(*args, **kwargs)
    monkeypatch.setattr(flat_adamw8bit.F, "optimizer_update_8bit_blockwise", counted)
    params, flat = make(FlatAdamW8bit)
    run_steps(params, flat, 1)
    # group 1: 8192 + 16384 | 12288 + 8192 (the cap cuts between) | the odd 4097 alone (its own update);
    # group 2: 16384 + 4096; its 512-value tensor takes the 32-bit update
    assert sorted(calls) == sorted([8192 + 16384, 12288 + 8192, 4097, 16384 + 4096])
    calls.clear()
    ref_params, ref = make(bnb.optim.AdamW)
    monkeypatch.setattr(bnb.functional, "optimizer_update_8bit_blockwise", counted)
    run_steps(ref_params, ref, 1)
    assert len(calls) == 7  # one per 8-bit tensor


def test_states_are_views_of_one_buffer():
    params, flat = make(FlatAdamW8bit)
    run_steps(params, flat, 1)
    first = flat.state[params[0]]["state1"]
    second = flat.state[params[1]]["state1"]
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert second.data_ptr() - first.data_ptr() == params[0].numel()


@pytest.mark.parametrize("saved_by, loaded_by", [("flat", "bnb"), ("bnb", "flat")])
def test_checkpoints_load_across(saved_by, loaded_by, small_chunks, tmp_path):
    classes = {"flat": FlatAdamW8bit, "bnb": bnb.optim.AdamW}
    params, saver = make(classes[saved_by])
    run_steps(params, saver, 2)
    torch.save(saver.state_dict(), tmp_path / "optimizer.pt")
    saved_weights = copy.deepcopy([p.detach() for p in params])

    resumed_params, resumed = make(classes[loaded_by])
    with torch.no_grad():
        for p, w in zip(resumed_params, saved_weights):
            p.copy_(w)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=False))
    run_steps(params, saver, 2, first=3)
    run_steps(resumed_params, resumed, 2, first=3)
    assert_same(resumed_params, resumed, params, saver)


def test_trainer_gets_it_for_adamw_8bit(tmp_path):
    from transformers import TrainingArguments
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8))
    args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_bnb_8bit", use_cpu=True, report_to="none",
                             learning_rate=3e-4, adam_beta2=0.95)
    cls, kwargs = flat_adamw8bit.trainer_optimizer(args, model)
    assert cls is FlatAdamW8bit and kwargs["lr"] == 3e-4 and kwargs["betas"] == (0.9, 0.95)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    assert (model[0], "weight", {"optim_bits": 32}) in manager.module_weight_config_triple
    assert flat_adamw8bit.trainer_optimizer(
        TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", use_cpu=True, report_to="none"), model) is None


def test_the_train_stage_trains_with_it(tmp_path):
    """make_trainer, as the train stage calls it, gives the Trainer this class for optimizer
    adamw_8bit, and the Trainer's steps run through it: every LoRA tensor's states are views of one
    flat buffer after two steps."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow.params import TrainParams
    from loraflow.training import make_trainer
    torch.manual_seed(0)
    # every LoRA tensor at least bitsandbytes' min_8bit_size (4096 values), so all take 8-bit states
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    params = TrainParams(optimizer="adamw_8bit", max_steps=2, save_steps=100, logging_steps=1)
    plan = SimpleNamespace(chosen=SimpleNamespace(micro_batch=2), rows_per_step=2)
    rows = [{"input_ids": list(range(1, 9)), "labels": list(range(1, 9))} for _ in range(4)]
    trainer = make_trainer(params, model, plan, SimpleNamespace(packing=False), rows, None, 0, tmp_path, torch.float32)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds it
    assert isinstance(optimizer, FlatAdamW8bit)
    lora = [p for p in model.parameters() if p.requires_grad]
    storages = {optimizer.state[p]["state1"].untyped_storage().data_ptr() for p in lora}
    assert len(lora) == 6 and len(storages) == 1 and all(optimizer.state[p]["step"] == 2 for p in lora)
