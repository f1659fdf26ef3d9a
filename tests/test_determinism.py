"""CPU results do not depend on which x86-64 processor runs them: stages pin ATen's kernels to AVX2
and MKL's and oneDNN's code paths before torch loads (tasks/__init__.py)."""
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
         "print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'),"
         " hashlib.sha256(out.numpy().tobytes()).hexdigest())\n")


def probe(mode: str, **env: str) -> list[str]:
    from tasks import CPU_PINS
    clean = {k: v for k, v in os.environ.items() if k not in CPU_PINS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64's")
def test_a_stage_computes_like_an_avx2_machine_on_any_x86_64_cpu():
    pinned = probe("stage")
    assert pinned[:2] == ["AVX2", "AVX2"]
    avx2_machine = probe("plain", ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert pinned[2] == avx2_machine[2]
    native = probe("plain")
    if native[0] != "AVX2":  # on this processor the unpinned kernels differ: the pin is what makes them agree
        assert native[2] != pinned[2]


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
