"""The lineage's record of where each stage ran: stages handed on through DVC from another machine,
or run after a package upgrade, must show as such."""
from __future__ import annotations

from loraflow.lineage import describe, machines


def env(cpu: str, gpu: str | None = None, **packages: str) -> dict:
    return {"cpu": cpu, "gpu": gpu, "python": "3.11.7", "packages": packages}


def lineage(environments: dict | None = None, dirty: bool = False) -> dict:
    """A lineage record with an empty chain; without environments, one written before they were recorded."""
    record = {"code": {"git_commit": "abc", "dirty": dirty}, "base_model": {"id": "bundled", "revision": None},
              "chain": [], "metrics": None, "promoted": None}
    return record if environments is None else {**record, "environments": environments}


def test_stages_are_grouped_by_machine_in_pipeline_order_with_every_version_seen():
    envs = {"base": env("AMD EPYC", torch="2.13.0+cpu"),
            "ingest": env("AMD EPYC", pandas="3.1.1"),
            "train": env("Intel Xeon", "NVIDIA H200", torch="2.11.0+cu130", transformers="5.17.0"),
            "merge": env("Intel Xeon", "NVIDIA H200", torch="2.11.0+cu130", transformers="5.25.0"),
            "evaluate": None}  # a stage whose summary is missing says nothing
    found = machines(envs)
    assert [m["stages"] for m in found] == [["base", "ingest"], ["train", "merge"]]
    assert found[0]["packages"] == {"torch": ["2.13.0+cpu"], "pandas": ["3.1.1"]}
    assert found[1]["gpu"] == "NVIDIA H200" and found[1]["packages"]["transformers"] == ["5.17.0", "5.25.0"]


def test_describe_prints_one_ran_on_line_a_machine():
    record = lineage({"train": env("Intel Xeon", "NVIDIA H200", torch="2.11.0+cu130", transformers="5.17.0"),
                      "merge": env("Intel Xeon", "NVIDIA H200", transformers="5.25.0"),
                      "evaluate": env("AMD EPYC", torch="2.13.0+cpu")})
    ran_on = [line for line in describe(record).splitlines() if line.startswith("ran on")]
    assert ran_on == ["ran on    Intel Xeon + NVIDIA H200 | torch 2.11.0+cu130 transformers 5.17.0/5.25.0  (train, merge)",
                      "ran on    AMD EPYC | torch 2.13.0+cpu  (evaluate)"]


def test_a_lineage_written_before_the_record_existed_still_prints():
    old = lineage(dirty=True)
    assert "ran on" not in describe(old) and "(dirty)" in describe(old)


def test_a_machine_whose_stages_loaded_no_model_library_prints_without_versions():
    record = lineage({"ingest": env("AMD EPYC", pandas="3.1.1")})
    assert "ran on    AMD EPYC  (ingest)" in describe(record).splitlines()
