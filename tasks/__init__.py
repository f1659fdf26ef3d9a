"""One module per pipeline stage: its logic as plain functions and a `run(params)`, started as
`python -m tasks.<stage>` by dvc.yaml and by the Prefect flow."""
import os
import platform

from loraflow.processes import die_with_parent

# First thing a stage process does, before its slow imports: die with whatever started it (`dvc repro`,
# the flow), so it never trains on as an orphan beside the next run.
die_with_parent()

# The same bits on any x86-64 CPU, set before torch loads: ATen's vectorised kernels round differently
# at AVX512 and AVX2 (a softmax's bits differ between the two on one machine), and MKL and oneDNN pick
# their code paths by CPU. oneDNN's cap also keeps ATen off its AMX paths, which under the AVX2 pin
# fail outright ("pack_vnni2 is only supported when avx512 is supported": bf16 attention on an AMX
# Xeon). Set any of them yourself to choose otherwise; lineage records them.
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if platform.machine().lower() in ("x86_64", "amd64"):
    for name, value in CPU_PINS.items():
        os.environ.setdefault(name, value)
