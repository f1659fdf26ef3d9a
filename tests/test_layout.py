"""dvc.yaml, loraflow/layout.py and the flow agree; GPU-side stages import without orchestration packages."""
import subprocess
import sys
from pathlib import Path

import yaml

from loraflow import layout

ROOT = Path(__file__).resolve().parent.parent


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def paths(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_every_layout_path_is_a_declared_output():
    declared = set()
    for stage in dvc_stages().values():
        declared |= paths(stage.get("outs")) | paths(stage.get("metrics")) | paths(stage.get("plots"))
    wanted = {str(v) for k, v in vars(layout).items() if isinstance(v, Path) and k.isupper()}
    # an input, two folders, and the train stage's scratch space (checkpoints, multi-GPU launch files)
    wanted -= {str(layout.BASE_CORPUS), str(layout.TOKENS_DIR), str(layout.STAGE_SUMMARIES), str(layout.CHECKPOINTS_DIR),
               str(layout.LAUNCH_DIR),
               str(layout.BUILD_INFO),  # ... a file inside the declared models/base
               str(layout.TRAIN_LIVE),  # ... DVCLive's folder, whose metrics and plots are declared
               str(layout.SCORES_DIR),  # ... the folder of evaluate's declared score files
               str(layout.RUN_RECORD),  # ... and the flow's own record of its last run
               str(layout.PLAN_PREVIEW_MD), str(layout.PLAN_PREVIEW_JSON)}  # ... and `loraflow plan`'s, run by hand
    assert wanted - declared == set()


def test_one_list_of_stages_drives_dvc_the_flow_and_the_params_sections():
    from loraflow.params import SECTIONS
    assert tuple(dvc_stages()) == layout.STAGES
    assert set(SECTIONS) == set(layout.STAGES) | {"schedule"}  # schedule: the deployment's, read by no stage


def test_each_stage_runs_its_own_module_reads_its_own_params_and_writes_its_summary():
    stages = dvc_stages()
    for name, stage in stages.items():
        assert stage["cmd"] == f"bin/stage {name}"  # python -m tasks.<name>, with the project's interpreter
        assert stage.get("params") == ([name] if name != "lineage" else None)
        assert f"tasks/{name}.py" in stage["deps"]
        assert str(layout.stage_summary(name)) in paths(stage["outs"])


def test_gpu_stages_import_without_prefect_dvc_or_pandera():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'prefect', 'dvc', 'pandera'}: raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import tasks.train, tasks.merge, tasks.evaluate\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_committed_dvc_lock_records_the_pipeline_as_dvc_yaml_declares_it():
    """dvc.lock is committed so a clone knows what produced the results; it must describe this
    dvc.yaml (the same stages, commands, dependency and output paths), or `make run` on a fresh clone
    rewrites it. Regenerate it with `make run` after changing dvc.yaml."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    stages = dvc_stages()
    assert set(lock) == set(stages)
    for name, stage in stages.items():
        recorded = lock[name]
        assert recorded["cmd"] == stage["cmd"], name
        assert {d["path"] for d in recorded.get("deps", [])} == paths(stage.get("deps")), name
        declared = paths(stage.get("outs")) | paths(stage.get("metrics")) | paths(stage.get("plots"))
        assert {o["path"] for o in recorded.get("outs", [])} == declared, name


def test_dvc_repro_works_from_a_plain_shell(tmp_path):
    """No venv on PATH (a user's plain shell after `make install`): each stage still runs with the
    project's interpreter, because dvc.yaml runs bin/stage, not whatever `python` the shell has."""
    import subprocess

    from conftest import BIN, make_workspace
    ws = make_workspace(tmp_path / "ws")
    (ws / ".venv").symlink_to(ROOT / ".venv")  # where `make install` puts it in a checkout
    plain = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(BIN / "dvc"), "repro", "validate"], cwd=ws, env=plain, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (ws / "data/interim/validated.parquet").is_file() and "Running stage 'validate'" in proc.stdout


def test_every_cli_flag_has_help_and_the_overview_lists_it():
    """`loraflow --help` names every subcommand with all its flags; `loraflow <cmd> --help` explains each."""
    import argparse

    from flows.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        line = next((l for l in parser.description.splitlines() if l.strip().startswith(f"loraflow {name}")), None)
        assert line is not None, f"loraflow --help does not list {name}"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"loraflow {name} {action.option_strings}: no help text"
            assert any(o in line for o in action.option_strings), f"loraflow --help omits {name} {action.option_strings}"
