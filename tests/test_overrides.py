"""Run-time overrides, the workspace lock and the promotion gate's decision."""
import re
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
PARAMS = "# top comment\n" + re.sub(r"(?m)^  lr: .*$", "  lr: 0.002  # peak lr", (ROOT / "params.yaml").read_text(), count=1)
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


def test_overrides_hold_for_the_run_only_however_it_ends(params_file):
    from loraflow import overrides
    with overrides.for_this_run(params_file, {"train.lr": 0.05, "evaluate.max_rows": 7}) as used:
        assert used == {"train.lr": 0.05, "evaluate.max_rows": 7}
        assert "lr: 0.05" in params_file.read_text()
    assert params_file.read_text() == PARAMS
    with pytest.raises(KeyboardInterrupt):  # a cancel or a timeout mid-run
        with overrides.for_this_run(params_file, {"train.lr": 0.05}):
            raise KeyboardInterrupt
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


def records(tuned: list[float], base: list[float], families: list[str] | None = None) -> list[dict]:
    """Rows as the evaluate stage writes them, both gated metrics scored alike."""
    families = families or ["f"] * len(tuned)
    return [{"family": f, "tuned_scores": {"exact_match": t, "rougeL": t}, "base_scores": {"exact_match": b, "rougeL": b}}
            for t, b, f in zip(tuned, base, families)]


def test_gate_promotes_a_clear_win_over_base():
    rows = records([1.0] * 60 + [0.0] * 40, [0.0] * 100)
    ok, reasons, comparisons = decide(rows, None, PromoteParams(min_gain_over_base=0.1))
    assert ok and comparisons["exact_match"]["base"]["difference"] == 0.6
    assert comparisons["exact_match"]["base"]["low"] > 0.1 and "champion" not in comparisons["exact_match"]
    assert all(r.endswith(": pass") for r in reasons)


def test_gate_refuses_a_gain_inside_the_noise_and_says_so():
    """A mean gain above the margin, on too few rows to tell it from chance: 'not significant'."""
    rows = records([1.0, 0.0] * 10, [0.0, 0.0, 1.0, 0.0] * 5)
    ok, reasons, comparisons = decide(rows, None, PromoteParams(min_gain_over_base=0.15))
    d = comparisons["rougeL"]["base"]
    assert d["difference"] == 0.25 and d["low"] < 0.15 < d["difference"]
    assert not ok and any(r.startswith("rougeL") and r.endswith("not significant") for r in reasons)
    ok, reasons, _ = decide(rows, None, PromoteParams(min_gain_over_base=0.3))
    assert not ok and any(r.endswith(": FAIL") for r in reasons)  # below the margin even on the mean


def test_gate_compares_with_the_champion_on_the_same_rows():
    rows = records([1.0] * 50 + [0.0] * 50, [0.0] * 100)
    better = {"exact_match": [1.0] * 70 + [0.0] * 30, "rougeL": [1.0] * 70 + [0.0] * 30}
    ok, reasons, comparisons = decide(rows, better, PromoteParams())
    assert not ok and comparisons["exact_match"]["champion"]["verdict"] == "FAIL"
    assert any(r.startswith("exact_match: challenger vs champion 0.5000 vs 0.7000: -0.2000") for r in reasons)
    worse = {k: [1.0] * 20 + [0.0] * 80 for k in better}
    ok, _, comparisons = decide(rows, worse, PromoteParams())
    assert ok and comparisons["rougeL"]["champion"]["low"] > 0
    same = {k: [r["tuned_scores"][k] for r in rows] for k in better}  # a retrain that changed nothing
    ok, _, comparisons = decide(rows, same, PromoteParams())
    assert not ok and comparisons["exact_match"]["champion"]["verdict"] == "not significant"


def test_paired_bootstrap_is_seeded_and_pairs_rows():
    from loraflow.significance import paired_bootstrap
    a, b = [0.2, 0.9, 0.4, 0.7, 0.1] * 8, [0.1, 0.8, 0.3, 0.6, 0.0] * 8
    d = paired_bootstrap(a, b)
    # every row gains exactly 0.1: pairing removes the rows' spread, so the interval is the point
    assert d.difference == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    shuffled = paired_bootstrap(a, b[::-1])
    assert shuffled.low < 0.1 < shuffled.high  # unpaired, the same means are noise
    assert paired_bootstrap(a, b[::-1]) == shuffled  # seeded
    assert paired_bootstrap([None, 1.0], [0.0, None]) is None  # no row scored by both


def test_a_family_that_regresses_shows_although_the_mean_rises():
    from tasks.promote import family_slices
    tuned = [1.0] * 40 + [0.0] * 20
    champion = [0.0] * 40 + [1.0] * 20
    rows = records(tuned, [0.0] * 60, ["capital"] * 40 + ["antonym"] * 20)
    slices = family_slices(rows, {"exact_match": champion, "rougeL": champion}, PromoteParams())
    assert slices["antonym"]["exact_match"]["regression"] and not slices["capital"]["exact_match"]["regression"]
    assert slices["antonym"]["exact_match"]["champion"] == 1.0 and slices["antonym"]["exact_match"]["tuned"] == 0.0


def test_the_promoted_adapter_is_a_rival_only_in_its_scope_and_on_its_base():
    """A user who replaces the demo's data names a new promote.scope: the demo's champion is then no
    rival, and the report's first line says what the challenger was compared with."""
    from tasks.promote import compared_against, not_a_rival
    demo = {"adapter_sha256": "a" * 64, "eval_rows_sha256": "e" * 64, "base_sha256": "b" * 64, "scope": "default"}
    assert not_a_rival(demo, "b" * 64, "default") is None
    assert "promote.scope 'default' and this run's is 'tickets'" in not_a_rival(demo, "b" * 64, "tickets")
    assert "another base model" in not_a_rival(demo, "c" * 64, "default")
    older = {k: v for k, v in demo.items() if k not in ("scope", "base_sha256")}  # a registry from before both
    assert not_a_rival(older, "c" * 64, "default") is None
    assert compared_against({"champion": None, "scope": "tickets"}, demo) == "Compared against: the base model only."
    line = compared_against({"champion": {"adapter_sha256": "a" * 64}, "scope": "default"}, demo)
    assert "promoted adapter aaaaaaaaaaaa (scope 'default', promoted on eval rows eeeeeeeeeeee)" in line


def test_data_changes_since_the_champion():
    import pandas as pd

    from loraflow.data_changes import compare, markdown
    champion = pd.DataFrame({"id": ["a", "b", "c"], "family": ["capital", "capital", "antonym"], "length": [10, 20, 30]})
    now = pd.DataFrame({"id": ["b", "c", "d", "e"], "family": ["capital", "antonym", "sentiment", "sentiment"],
                        "length": [20, 30, 100, 120]})
    c = compare(champion, now)
    assert (c["added"], c["removed"], c["kept"]) == (2, 1, 2)
    assert c["families_appeared"] == ["sentiment"] and c["families_vanished"] == []
    assert c["family_rows"]["capital"] == {"champion": 2, "now": 1}
    assert c["length_tokens"]["champion"]["p50"] == 20 and c["length_tokens"]["now"]["mean"] == 67.5
    text = markdown(c)
    assert "**2 added, 1 removed**" in text and "Families that appeared: sentiment" in text
