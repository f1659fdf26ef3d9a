"""Evaluation during training, early stopping, keeping the best adapter, and live tracking through
DVCLive, in a real workspace with `dvc repro` and `dvc exp show`."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import BIN, edit_params, make_tiny, make_workspace, read_json, sh

pytestmark = pytest.mark.slow
DVC = str(BIN / "dvc")


def test_training_evaluates_stops_early_keeps_the_best_and_logs_live(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    make_tiny(ws)
    # a learning rate far too high: the eval loss soon rises, so the run must stop and keep an earlier step
    edit_params(ws, train={"lr": 0.5, "max_steps": 40, "eval_steps": 4, "save_steps": 4, "keep": "best",
                           "early_stopping_patience": 1, "logging_steps": 2})
    sh([DVC, "repro", "train"], ws)
    summary = read_json(ws, "reports/stages/train.json")
    curve = pd.read_csv(ws / "reports/train_loss.csv").dropna(subset=["eval_loss"])
    assert len(curve) >= 2, "the eval loss is computed during training"
    best = curve.loc[curve["eval_loss"].idxmin()]
    assert summary["kept"] == "best" and summary["stopped_early"] and summary["steps"] < 40
    assert summary["best_step"] == best["step"] and summary["best_eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-4)
    # the adapter written is the best one: its eval loss, computed afresh, is the best logged
    assert summary["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-3)
    assert summary["steps"] - summary["best_step"] == 4  # stopped at the first evaluation without improvement

    live = read_json(ws, "reports/train_live/metrics.json")
    assert live["step"] == summary["steps"] and "loss" in live["train"] and "loss" in live["eval"]
    losses = pd.read_csv(ws / "reports/train_live/plots/metrics/train/loss.tsv", sep="\t")
    assert list(losses["step"])[:4] == [1, 2, 4, 6] and (ws / "reports/train_live/plots/metrics/eval/loss.tsv").is_file()
    assert (ws / "reports/train_live/plots/metrics/train/tokens_per_second.tsv").is_file()
    shown = sh([DVC, "exp", "show", "--csv"], ws).stdout.splitlines()
    header = shown[0].split(",")
    assert "eval.loss" in header and "train.loss" in header, header
    plots = sh([DVC, "plots", "show", "--json"], ws).stdout
    assert "train_live/plots/metrics/eval/loss.tsv" in plots
    print(json.dumps({k: summary[k] for k in ("steps", "best_step", "best_eval_loss", "eval_loss")}))


def test_a_run_shorter_than_logging_steps_still_has_its_curve(tmp_path):
    """3 steps with logging_steps 5: the first step is logged, so the loss curve and DVCLive's plot
    files (outputs dvc.yaml declares) exist and the stage completes."""
    ws = make_workspace(tmp_path / "ws")
    make_tiny(ws)
    edit_params(ws, train={"max_steps": 3, "logging_steps": 5, "save_steps": 100})
    sh([DVC, "repro", "train"], ws)
    losses = pd.read_csv(ws / "reports/train_live/plots/metrics/train/loss.tsv", sep="\t")
    assert list(losses["step"]) == [1]
    assert list(pd.read_csv(ws / "reports/train_loss.csv")["step"]) == [1]


def test_keep_best_without_evaluations_is_refused_with_the_fix():
    from pydantic import ValidationError

    from loraflow.params import TrainParams
    with pytest.raises(ValidationError, match="train.keep: best needs train.eval_steps"):
        TrainParams(keep="best")
    with pytest.raises(ValidationError, match="multiple of train.eval_steps"):
        TrainParams(keep="best", eval_steps=4, save_steps=10)
    with pytest.raises(ValidationError, match="early_stopping_patience needs train.keep: best"):
        TrainParams(eval_steps=4, early_stopping_patience=2)
