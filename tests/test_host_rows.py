"""loraflow.host_rows: the GPU's own gather of embedding rows from pinned CPU memory, checked on CPU by
Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so the check runs in a
process of its own), and the CpuEmbedding paths around it. On a GPU, `python3 tests/test_host_rows.py`
runs the same check with the table pinned in CPU memory and the ids on the GPU."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from loraflow import fastpath, host_rows

ROOT = Path(__file__).resolve().parent.parent


def check() -> None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    ids_device = "cpu" if interpreted else "cuda"
    # fp16: the interpreter mishandles bf16 loads; the kernel only moves bits, so the dtype is no matter
    dtype = torch.float16 if interpreted else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    for rows, width in ((50, 2500), (7, 64), (300, 1024)):  # a ragged last block, one short block, exact blocks
        table = torch.randn(rows, width, generator=g).to(dtype)
        if not interpreted:
            table = table.pin_memory()
        ids = torch.randint(0, rows, (3, 41), generator=g)
        ids[0, :5] = rows - 1  # repeats and the last row
        got = host_rows.gather(table, ids.to(ids_device))
        assert got.device.type == ids_device and got.shape == (3, 41, width), (got.device, got.shape)
        assert torch.equal(got.cpu(), table[ids]), f"rows {rows} width {width}: not the table's rows"
    empty = host_rows.gather(table, torch.zeros(0, dtype=torch.long, device=ids_device))
    assert empty.shape == (0, table.shape[1])
    print("OK")


def test_gather_under_triton_interpreter():
    import pytest  # here, so that the GPU check runs where pytest is not installed
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


def test_usable_only_for_gpu_ids_and_a_pinned_table():
    table = torch.zeros(4, 8)
    assert not host_rows.usable(table, torch.zeros(2, dtype=torch.long))  # CPU ids: the CPU looks them up


def test_cpu_embedding_looks_up_on_cpu_without_a_gpu():
    embedding = torch.nn.Embedding(10, 6)
    wrapped = fastpath.CpuEmbedding(embedding)
    ids = torch.tensor([[3, 1, 3], [9, 0, 2]])
    assert torch.equal(wrapped(ids), embedding.weight[ids])


if __name__ == "__main__":
    check()
