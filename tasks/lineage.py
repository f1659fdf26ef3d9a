"""lineage stage: reports/lineage.json links raw data -> validated -> tokens -> adapter -> merged ->
metrics by content hash, with each stage's params, the code version and the base model.

    python -m tasks.lineage     (or: dvc repro lineage; `loraflow lineage` prints it)

It runs last and reads dvc.lock, which DVC has updated after every earlier stage, so the hashes
are DVC's own. The git commit is the code version the results were produced with; `dirty` says
whether tracked files differed from it.
"""
from __future__ import annotations

from loraflow import layout
from loraflow.artifacts import write_json
from loraflow.lineage import build, describe
from loraflow.params import LineageParams
from loraflow.stage import main


def run(params: LineageParams) -> dict:
    lineage = build()
    write_json(layout.LINEAGE, lineage)
    print(describe(lineage))
    return {"links": len(lineage["chain"]), "git_commit": lineage["code"]["git_commit"]}


if __name__ == "__main__":
    main("lineage", run)
