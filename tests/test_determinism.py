"""CPU results do not depend on which x86-64 processor runs them: stages pin ATen's kernels to AVX2,
MKL's and oneDNN's code paths and the thread count before torch loads (tasks/__init__.py)."""
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = ("import hashlib, os, sys\n"
         "if sys.argv[1] == 'stage':\n"
         "    import tasks  # what `python -m tasks.<stage>` runs first\n"
         "import torch\n"
         "torch.manual_seed(0)\n"
         "a, b = torch.randn(257, 1031), torch.randn(1031, 263)\n"
         "out = torch.cat([torch.softmax(a @ b, -1).flatten(), torch.nn.functional.layer_norm(a, (1031,)).flatten()])\n"
         "total = torch.randn(3000, 3000).sum()  # ATen splits a sum by thread\n"
         "print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'), torch.get_num_threads(),"
         " hashlib.sha256(out.numpy().tobytes()).hexdigest(), total.item())\n")


def probe(mode: str, **env: str) -> list[str]:
    from tasks import CPU_PINS
    clean = {k: v for k, v in os.environ.items() if k not in CPU_PINS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64's")
def test_a_stage_computes_like_an_avx2_machine_on_any_x86_64_cpu():
    from tasks import CPU_PINS, has_nvidia_gpu
    if has_nvidia_gpu():
        pytest.skip("on a GPU host MKL's branch and the threads are not pinned")
    pinned = probe("stage")
    assert pinned[:3] == ["AVX2", "COMPATIBLE", "2"]
    # MKL's "compatible" branch is the one Intel documents as the same on Intel and AMD processors
    avx2_machine = probe("plain", **CPU_PINS)
    assert pinned[3:] == avx2_machine[3:]
    native = probe("plain")
    if native[0] != "AVX2":  # on this processor the unpinned kernels differ: the pin is what makes them agree
        assert native[3] != pinned[3]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64's")
def test_the_thread_count_is_pinned_because_it_changes_a_sum():
    """A machine with more cores would run more threads, and ATen splits a sum by thread: the same
    tensor sums to other bits on 1 thread than on 2. Stages run on CPU_THREADS whatever the cores."""
    from tasks import CPU_PINS, CPU_THREADS, has_nvidia_gpu
    if has_nvidia_gpu():
        pytest.skip("on a GPU host the threads are not pinned")
    pinned = probe("stage")
    assert pinned[2] == CPU_THREADS
    one_thread = probe("plain", **{**CPU_PINS, "OMP_NUM_THREADS": "1"})
    assert one_thread[4] != pinned[4]  # the sum: the pin is what makes it agree (here the GEMM's bits differ too)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64's")
def test_a_stage_runs_bf16_attention_under_the_pins():
    """With ATen pinned to AVX2 but oneDNN free, bf16 attention on an AMX Xeon fails ("pack_vnni2 is
    only supported when avx512 is supported"); the stage's pins keep every kernel on one path."""
    code = ("import tasks, torch\n"
            "q = torch.randn(1, 4, 64, 32, dtype=torch.bfloat16)\n"
            "out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
            "print(out.dtype, bool(out.float().isfinite().all()))\n")
    from tasks import CPU_PINS
    clean = {k: v for k, v in os.environ.items() if k not in CPU_PINS}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch.bfloat16", "True"]


# The base stage's pretraining, three steps, then again with AdamW as torch's single-tensor loop with
# correctly rounded square roots (numpy's) standing in for whatever optimizer the stage made
ADAMW_PROBE = """
import hashlib, numpy as np, tasks, torch
from pathlib import Path
from loraflow.params import BundledBase
from tasks.base import build_model, pretrain, read_corpus, train_tokenizer

class CorrectlyRounded(torch.optim.AdamW):
    def __init__(self, params, **kw):
        kw.pop("fused", None)
        super().__init__(params, foreach=False, **kw)

    def step(self, closure=None):
        plain, torch.Tensor.sqrt = torch.Tensor.sqrt, lambda t: torch.from_numpy(np.sqrt(t.detach().numpy()))
        try:
            return super().step(closure)
        finally:
            torch.Tensor.sqrt = plain

corpus = read_corpus(Path("data/base_corpus.txt"))
shape = BundledBase().model_copy(update={"pretrain_steps": 3})
tok = train_tokenizer(corpus, shape.vocab_size)
for optimizer in ("stage", "reference"):
    if optimizer == "reference":
        torch.optim.AdamW = CorrectlyRounded
    torch.manual_seed(shape.seed)
    model = build_model(tok, shape)
    pretrain(model, tok, corpus, shape)
    sd = model.state_dict()
    print(hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest())
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64's")
def test_the_base_stage_steps_adamw_with_correctly_rounded_square_roots():
    """torch's single-tensor AdamW takes its square roots from MKL's vector math, whose last bit depends
    on the processor whatever MKL_CBWR says (an AMD EPYC and an Intel Xeon parted at the second step;
    benchmarks/results/cpu-determinism.md). The stage's weights after three steps must be those of
    AdamW with correctly rounded roots, which every processor computes alike."""
    from tasks import CPU_PINS, has_nvidia_gpu
    if has_nvidia_gpu():
        pytest.skip("on a GPU host MKL's branch and the threads are not pinned")
    clean = {k: v for k, v in os.environ.items() if k not in CPU_PINS}
    out = subprocess.run([sys.executable, "-c", ADAMW_PROBE], cwd=ROOT, env=clean, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    stage, reference = out.stdout.split()
    assert stage == reference


def test_the_train_stage_steps_the_fused_adamw_on_cpu(tmp_path):
    """The Trainer's AdamW on CPU is the fused kernel, the one with correctly rounded square roots."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow.params import TrainParams
    from loraflow.training import make_trainer
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2)),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    plan = SimpleNamespace(chosen=SimpleNamespace(micro_batch=1), rows_per_step=1)
    trainer = make_trainer(TrainParams(max_steps=1, save_steps=100, logging_steps=1), model, plan,
                           SimpleNamespace(packing=False), [], None, 0, tmp_path, torch.float32)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
