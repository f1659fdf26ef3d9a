"""The batch-invariant GPU kernels, run on CPU by Triton's interpreter: close to PyTorch, and each row
bitwise the same alone as in a padded batch (prefill and decode attention, both matmul kernels, RMSNorm, rope)."""
import os
import subprocess
import sys
from pathlib import Path


def test_kernels_under_triton_interpreter():
    script = Path(__file__).with_name("triton_interpret_check.py")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1].startswith("OK"), done.stdout + done.stderr

