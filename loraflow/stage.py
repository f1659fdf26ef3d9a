"""The command-line entry shared by every stage: `python -m tasks.<stage> [--params FILE]`.

It loads the stage's own params section, runs the stage, times it, writes the stage's summary to
reports/stages/<stage>.json, and turns a LoraflowError into a clear message and exit code 2 with no
traceback, because input problems are the user's to fix and a traceback only hides the message.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from importlib import metadata
from typing import Callable

from loraflow import distributed
from loraflow.artifacts import write_json
from loraflow.errors import LoraflowError
from loraflow.layout import stage_summary
from loraflow.params import Section, load_section
from loraflow.secrets import RedactingFilter, redact

log = logging.getLogger("loraflow")


# Libraries' notices that say nothing about this run: deprecations inside transformers and peft (our
# own calls use the current names), and bitsandbytes' and kernels' offline hub lookups for CPU kernels
QUIET_LOGGERS = ("kernels", "bitsandbytes.backends.cpu")
QUIET_WARNINGS = (r".*is deprecated and will be removed in v6.*",)


def configure_logging() -> None:
    import warnings
    logging.basicConfig(level=os.environ.get("LORAFLOW_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


# The libraries whose releases can change a stage's numbers or bytes, recorded when the stage loaded them
RESULT_SHAPING = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "tokenizers", "safetensors",
                  "numpy", "pandas", "pyarrow", "pandera", "datasets", "rouge_score", "evaluate", "liger_kernel")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kernels(torch) -> dict:
    """What decides CPU results' bits besides the code: the kernels ATen, MKL and oneDNN were pinned to,
    and the thread count."""
    return {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{name: os.environ.get(name) for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")},
            "threads": torch.get_num_threads()}


def environment() -> dict:
    """Where this stage ran: the processor, the GPU, and the versions of the libraries it loaded. A stage
    run elsewhere (another machine, a colleague's, a package upgrade) can write other bytes from the same
    inputs; this says which machine and releases made these."""
    loaded = {}
    for module in RESULT_SHAPING:
        if module in sys.modules:
            try:
                loaded[module] = metadata.version(module.replace("_", "-"))
            except metadata.PackageNotFoundError:
                loaded[module] = getattr(sys.modules[module], "__version__", None)
    env = {"cpu": cpu_model(), "python": platform.python_version(), "packages": loaded}
    torch = sys.modules.get("torch")
    if torch is not None:
        env["cpu_kernels"] = cpu_kernels(torch)
        # the GPU the stage computed on; a stage that never touched CUDA (template, tokenize) names none,
        # and asking would start a CUDA context in it only to write its name
        env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_initialized() else None
    return env


def main(stage: str, run: Callable[[Section], dict], section: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    configure_logging()
    try:
        params = load_section(section or stage, args.params)
        t0 = time.perf_counter()
        summary = run(params)
    except LoraflowError as e:
        print(redact(f"loraflow {stage}: error: {e}"), file=sys.stderr)
        sys.exit(2)
    if not distributed.is_main_process():
        return  # one of several training processes: the main one (rank 0) writes the summary
    summary = {"stage": stage, "seconds": round(time.perf_counter() - t0, 2), **summary, "environment": environment()}
    write_json(stage_summary(stage), summary)
    log.info("%s done in %.1fs: %s", stage, summary["seconds"],
             {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
