"""`loraflow` command line.

    loraflow run      the pipeline as a Prefect flow (a temporary local server unless PREFECT_API_URL is set)
    loraflow repro    the pipeline with `dvc repro` (what `make run` does)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the pipeline as a Prefect flow")
    p_run.add_argument("--workdir", default=".", help="project directory (default: .)")
    sub.add_parser("repro", help="run the pipeline with dvc repro")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "run":
        from flows.finetune import finetune
        results = finetune(workdir=args.workdir)
        for r in results:
            print(f"{r['stage']:>9}: {'ran in %.1fs' % r['seconds'] if r['executed'] else 'up to date'}")
        return 0
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.call([str(dvc), "repro"])


if __name__ == "__main__":
    sys.exit(main())
