"""One module per pipeline stage: its logic as plain functions and a `run(params)`, started as
`python -m tasks.<stage>` by dvc.yaml and by the Prefect flow."""
import os
import platform

from loraflow.processes import die_with_parent

# First thing a stage process does, before its slow imports: die with whatever started it (`dvc repro`,
# the flow), so it never trains on as an orphan beside the next run.
die_with_parent()

# The same bits on any x86-64 CPU, set before torch loads: ATen's vectorised kernels round differently
# at AVX512 and AVX2 (a softmax's bits differ between the two on one machine), and MKL picks its code
# path by CPU. Set either variable yourself to choose otherwise; lineage records both.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")
