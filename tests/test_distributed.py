"""Multi-GPU training (train.num_gpus): the accelerate FSDP config we generate is what accelerate reads,
the memory plan shards, and the launch path really trains in 2 processes (gloo, CPU) with the same
math as one process."""
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import BIN, edit_params, make_tiny, make_workspace, read_json, sh
from loraflow import distributed, memplan, planning
from loraflow.errors import LoraflowError

TINY = memplan.Arch(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=600, tied=False)


def test_generated_fsdp_config_is_read_by_accelerate(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    path = tmp_path / "accelerate_config.yaml"
    path.write_text(yaml.safe_dump(distributed.accelerate_config(2)))
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP and config.num_processes == 2
    fsdp = config.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_cpu_ram_efficient_loading"] is True
    path.write_text(yaml.safe_dump(distributed.accelerate_config(2, fsdp=False)))
    assert load_config_from_file(str(path)).distributed_type == DistributedType.MULTI_GPU


def test_num_gpus_resolution():
    assert distributed.resolve_num_gpus("auto", 4) == 4
    assert distributed.resolve_num_gpus("auto", 0) == 1
    assert distributed.resolve_num_gpus(2, 2) == 2
    with pytest.raises(LoraflowError, match="num_gpus is 4 but this machine has 2"):
        distributed.resolve_num_gpus(4, 2)


def test_qlora_stores_4bit_weights_in_the_compute_dtype_when_sharded(monkeypatch):
    from loraflow.modeling import quantization_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # bitsandbytes' config needs no GPU to build
    assert quantization_config("qlora", torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config("qlora", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    with pytest.raises(LoraflowError, match="lora8 cannot be sharded"):
        quantization_config("lora8", torch.bfloat16, sharded=True)


def test_memory_plan_shards_weights_and_adapter_but_not_activations():
    one = memplan.Setup(method="qlora", tokens=1024, act_bytes=2)
    two = memplan.Setup(method="qlora", tokens=1024, act_bytes=2, shards=2)
    a, b = memplan.estimate(TINY, one), memplan.estimate(TINY, two)
    assert b["weights"] == pytest.approx(a["weights"] / 2)
    assert b["adapter"] == pytest.approx(a["adapter"] / 2)
    assert b["activations"] == a["activations"] and b["logits_loss"] == a["logits_loss"]
    # gathered in full: the root unit (embeddings, norm, lm_head) and two decoder layers
    per_layer = memplan.linear_weight_bytes(TINY, two) / TINY.layers
    assert b["fsdp_gathered"] == pytest.approx(TINY.other_params() * 2 + 2 * per_layer)
    assert "fsdp_gathered" not in a


def test_plan_splits_the_step_rows_over_processes():
    from loraflow.params import TrainParams
    arch = TINY
    params = TrainParams(rows_per_step=16)
    plan = planning.plan_for_params(params, arch, 64, act_bytes=4, fused=False, gpu_free_bytes=None, processes=2)
    assert plan.rows_per_step == 8 and plan.chosen.micro_batch == 8
    with pytest.raises(LoraflowError, match="cannot be split evenly over 3 GPUs"):
        planning.plan_for_params(params, arch, 64, act_bytes=4, fused=False, gpu_free_bytes=None, processes=3)


@pytest.mark.slow
def test_two_processes_over_gloo_train_one_adapter_with_the_one_process_math(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    make_tiny(ws)
    edit_params(ws, train={"dropout": 0.0})
    sh([str(BIN / "dvc"), "repro", "train"], ws)
    one_loss = pd.read_csv(ws / "reports/train_loss.csv")
    one_adapter = load_file(str(ws / "models/adapter/adapter_model.safetensors"))

    # the train stage's own launch path, as num_gpus > 1 takes it, here with data parallel over gloo
    code = ("from loraflow.params import load_section\nfrom tasks.train import launch_processes\n"
            "launch_processes(load_section('train', 'params.yaml'), 2, fsdp=False)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(ws, "reports/stages/train.json")
    rows_per_step = yaml.safe_load((ws / "params.yaml").read_text())["train"]["rows_per_step"]
    assert summary["processes"] == 2 and summary["micro_batch"] == rows_per_step // 2  # each process half the rows
    assert yaml.safe_load((ws / "models/launch/accelerate_config.yaml").read_text())["num_processes"] == 2
    two_loss = pd.read_csv(ws / "reports/train_loss.csv")
    two_adapter = load_file(str(ws / "models/adapter/adapter_model.safetensors"))
    assert len(two_loss) == len(one_loss) > 0
    for a, b in zip(one_loss["loss"], two_loss["loss"]):
        assert b == pytest.approx(a, rel=1e-4)
    assert two_adapter.keys() == one_adapter.keys()
    for name, tensor in one_adapter.items():
        torch.testing.assert_close(two_adapter[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_adapter_is_found_in_the_gathered_state_dict_of_an_fsdp_wrapped_model(tmp_path):
    """FSDP1 (it runs on CPU over gloo in one process) renames the modules it wraps, which hides the
    adapter from PEFT's own save; adapter_key_map, read before wrapping, finds it in the gathered state."""
    import os

    import torch.distributed as dist
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import free_port
    from loraflow.training import adapter_key_map, save_adapter
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    expected = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    keys = adapter_key_map(model)
    assert set(keys) == set(expected)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"),
                       use_orig_params=False)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
            gathered = wrapped.state_dict()
        assert get_peft_model_state_dict(model, state_dict=gathered) == {}  # what PEFT's own save would write
        save_adapter(model, {name: gathered[key] for name, key in keys.items()}, tmp_path / "adapter")
    finally:
        dist.destroy_process_group()
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    for name, tensor in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_plan_command_plans_per_gpu_for_fsdp(tmp_path, monkeypatch):
    from pathlib import Path

    from flows import cli
    config_dir = Path(__file__).resolve().parent.parent / "benchmarks/configs/llama-3.1-8b"
    monkeypatch.chdir(tmp_path)
    args = ["plan", "--model", str(config_dir), "--seq", "2048", "--batch", "8", "--method", "lora", "--budget-gib", "139"]
    assert cli.main(args) == 0
    one = read_json(tmp_path, "reports/memory_plan_preview.json")
    assert cli.main(args + ["--gpus", "2"]) == 0
    two = read_json(tmp_path, "reports/memory_plan_preview.json")
    assert two["gpus_sharing_weights"] == 2 and one["gpus_sharing_weights"] == 1
    assert two["predicted_gib"]["weights"] == pytest.approx(one["predicted_gib"]["weights"] / 2, abs=1e-3)
    assert two["predicted_gib"]["fsdp_gathered"] > 0 and two["rows_per_optimizer_step"] == 4


def test_token_rows_are_refused_under_fsdp_before_any_launch():
    from loraflow.errors import LoraflowError
    from tasks.train import refuse_sharded_token_rows
    refuse_sharded_token_rows([])
    with pytest.raises(LoraflowError, match="trainable_tokens: \\[\\] with train.modules_to_save: \\[lm_head\\]"):
        refuse_sharded_token_rows([3, 4])
