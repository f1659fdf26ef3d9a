"""Run-time overrides, the workspace lock and the promotion gate's decision."""
import threading
import time

import pytest
import yaml

from loraflow.errors import LoraflowError
from loraflow.overrides import apply, check, parse_cli
from loraflow.params import ParamsError, PromoteParams
from loraflow.workspace import workspace_lock
from tasks.promote import decide

from conftest import ROOT

# the project's own params (every section must be there), with a comment of our own on train.lr
PARAMS = "# top comment\n" + (ROOT / "params.yaml").read_text().replace("  lr: 0.001\n", "  lr: 0.002  # peak lr\n", 1)
assert "# peak lr" in PARAMS


@pytest.fixture
def params_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS)
    return p


def test_parse_cli_keeps_types():
    assert parse_cli(["train.lr=0.001", "train.target_modules=[q_proj, v_proj]", "ingest.system_prompt=hi"]) == {
        "train.lr": 0.001, "train.target_modules": ["q_proj", "v_proj"], "ingest.system_prompt": "hi"}
    with pytest.raises(ParamsError, match="section.key=value"):
        parse_cli(["train.lr"])


def test_apply_writes_values_and_keeps_comments(params_file):
    apply(params_file, {"train.lr": 0.001, "evaluate.max_rows": 50, "train.seed": 3})
    text = params_file.read_text()
    assert "# top comment" in text and "# peak lr" in text
    data = yaml.safe_load(text)
    assert (data["train"]["lr"], data["train"]["rank"], data["train"]["seed"]) == (0.001, 16, 3)
    assert data["evaluate"]["max_rows"] == 50


@pytest.mark.parametrize("overrides, named", [
    ({"train.lrr": 0.1}, "train.lrr: unknown key"),
    ({"train.rank": "big"}, "train.rank"),
    ({"nosection.x": 1}, "nosection.x: not a parameter"),
    ({"lr": 1}, "lr: not a parameter"),
    ({"train.rank.x": 1}, "train.rank.x: rank is not a section"),
])
def test_bad_override_names_the_key_and_leaves_params_untouched(params_file, overrides, named):
    with pytest.raises(ParamsError) as e:
        apply(params_file, overrides)
    assert named in str(e.value)
    assert params_file.read_text() == PARAMS


def test_check_reports_every_bad_key(params_file):
    with pytest.raises(ParamsError) as e:
        check(params_file, {"train.lrr": 1, "tokenize.overflow": "wrap"})
    assert "train.lrr" in str(e.value) and "tokenize.overflow" in str(e.value)


def test_workspace_lock_refuses_a_second_holder_then_waits(tmp_path):
    with workspace_lock(tmp_path, holder="run-A"):
        with pytest.raises(LoraflowError, match="busy.*run-A"):
            with workspace_lock(tmp_path, holder="run-B"):
                pass
    released = threading.Event()

    def hold():
        with workspace_lock(tmp_path, holder="run-A"):
            released.wait(5)
            time.sleep(0.3)
    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.2)
    released.set()
    with workspace_lock(tmp_path, wait_s=10, holder="run-B"):  # waits for A instead of failing
        pass
    t.join()


METRICS = {"base": {"exact_match": 0.1, "rougeL": 0.2}, "tuned": {"exact_match": 0.5, "rougeL": 0.6}}


def test_gate_promotes_a_clear_win_over_base():
    ok, reasons = decide(METRICS, None, PromoteParams(min_gain_over_base=0.1))
    assert ok and any("no adapter promoted before" in r for r in reasons)


def test_gate_refuses_small_gain_and_says_which_metric():
    ok, reasons = decide(METRICS, None, PromoteParams(min_gain_over_base=0.45))
    assert not ok and any(r.startswith("exact_match") and r.endswith("FAIL") for r in reasons)


def test_gate_compares_with_the_last_promoted_adapter():
    last = {"metrics": {"exact_match": 0.55, "rougeL": 0.5}}
    ok, reasons = decide(METRICS, last, PromoteParams())
    assert not ok and "exact_match: tuned 0.5000 vs last promoted 0.5500 (needs +0.0): FAIL" in reasons
    ok, _ = decide(METRICS, {"metrics": {"exact_match": 0.4, "rougeL": 0.5}}, PromoteParams())
    assert ok
