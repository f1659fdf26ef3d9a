"""Prints the machine a CI run is on, so a failure that depends on the processor names it: the CPU model,
the BLAS library (and the kernel it picked) that NumPy and torch use, and torch's CPU capability.

Run: .venv/bin/python .ci/machine_info.py   (.ci/run calls it before the tests)"""
import os
import platform
from pathlib import Path

import numpy
import threadpoolctl
import torch


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    print(f"processor: {cpu_model()} ({os.cpu_count()} logical CPUs, {platform.machine()})")
    blas_env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "MKL", "OMP"))}
    print(f"BLAS environment: {blas_env or 'none set'}")
    blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    print(f"numpy {numpy.__version__}: built with {blas.get('name')} {blas.get('version')}")
    for pool in threadpoolctl.threadpool_info():
        print(f"  loaded {pool['internal_api']} {pool.get('version')}: kernel {pool.get('architecture')},"
              f" {pool['num_threads']} threads ({pool['filepath']})")
    build = dict(item.split("=", 1) for item in torch.__config__.show().split("Build settings: ")[-1].split(", ")
                 if "=" in item)
    print(f"torch {torch.__version__}: BLAS {build.get('BLAS_INFO')}, LAPACK {build.get('LAPACK_INFO')},"
          f" CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
