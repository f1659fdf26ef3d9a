"""One module per pipeline stage: its logic as plain functions and a `run(params)`, started as
`python -m tasks.<stage>` by dvc.yaml and by the Prefect flow."""
import os
import platform

from loraflow.processes import die_with_parent

# First thing a stage process does, before its slow imports: die with whatever started it (`dvc repro`,
# the flow), so it never trains on as an orphan beside the next run.
die_with_parent()

# The same bits on any x86-64 CPU, Intel or AMD, set before torch loads (README, "Determinism"):
# - ATen's vectorised kernels round differently at AVX512 and AVX2 (a softmax's bits differ between
#   the two on one machine): pinned to AVX2, which every x86-64 CPU of the last decade has.
# - MKL's GEMMs take a different code path on Intel and on AMD at any ISA setting but one: its
#   "compatible" branch, the only one Intel documents as bitwise equal on both (it costs about 2x on
#   the bundled model's GEMMs).
# - oneDNN's cap also keeps ATen off its AMX paths, which under the AVX2 pin fail outright
#   ("pack_vnni2 is only supported when avx512 is supported": bf16 attention on an AMX Xeon).
# - A fixed thread count: ATen's reductions split their sums by thread, so a tensor's sum differs
#   between 1 and 2 threads on one machine; MKL's reproducibility also assumes a fixed count.
# On a GPU host only the first three apply: the GPU computes, and its threads are not pinned.
# Set any of them yourself to choose otherwise; lineage records them.
CPU_THREADS = "2"
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "OMP_NUM_THREADS": CPU_THREADS}


def has_nvidia_gpu() -> bool:
    """Whether the NVIDIA driver lists a GPU, read before torch loads (torch.cuda would load it)."""
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.isdir(gpus) and bool(os.listdir(gpus))


if platform.machine().lower() in ("x86_64", "amd64"):
    gpu = has_nvidia_gpu()
    for name, value in CPU_PINS.items():
        if gpu and name in ("MKL_CBWR", "OMP_NUM_THREADS"):
            continue
        os.environ.setdefault(name, value)
