"""Live tracking of a training run through DVCLive, DVC's own logger: every logging step appends the
train loss, learning rate, grad norm, eval loss (when computed), tokens/s and peak GPU memory to
reports/train_live/plots/metrics/*.tsv and rewrites reports/train_live/metrics.json. The train
stage declares them as its DVC plots and metrics, so `dvc plots show`/`diff`, `dvc exp show` (also
while a queued experiment runs) and DVC Studio read them.

DVCLive depends on dvc; where it is absent (a minimal GPU image) the stage trains without it and
says so once.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("loraflow.train")
LOGGED = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
          "eval_loss": "eval/loss"}


def live_callback(live_dir: Path):
    """A Trainer callback logging to DVCLive in live_dir, or None when dvclive is not installed.
    A run that resumes a checkpoint starts the files afresh from the log the checkpoint carries, so
    they are whole whatever a kill (or DVC, before rerunning the stage) left of them."""
    try:
        from dvclive import Live
    except ImportError:
        log.info("dvclive is not installed: no live metrics (reports/train_loss.csv is still written)")
        return None
    from transformers import TrainerCallback

    class LiveTracking(TrainerCallback):
        def __init__(self):
            self.live, self.last = None, None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                # no dvc.yaml of its own and no experiment of its own: dvc.yaml declares these files,
                # and `dvc exp run` makes the experiment
                self.live = Live(dir=str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None)
                for entry in state.log_history:  # a resumed run's earlier steps, from its checkpoint
                    self.log(entry.get("step", 0), entry)
                if state.log_history:
                    self.live.make_summary()
                self.last = (time.perf_counter(), state.num_input_tokens_seen)

        def log(self, step: int, logs: dict) -> None:
            self.live.step = step
            for key, name in LOGGED.items():
                if key in logs:
                    self.live.log_metric(name, float(logs[key]))

        def on_log(self, args, state, control, logs=None, **kw):
            if self.live is None or not logs:
                return
            self.log(state.global_step, logs)
            if "loss" in logs:
                now, seen = time.perf_counter(), state.num_input_tokens_seen
                if now > self.last[0] and seen > self.last[1]:
                    # every token of the batches, padding included where rows are padded
                    self.live.log_metric("train/tokens_per_second", round((seen - self.last[1]) / (now - self.last[0]), 1))
                self.last = (now, seen)
                if torch.cuda.is_available():
                    self.live.log_metric("train/peak_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 3))
            self.live.make_summary()

        def on_train_end(self, args, state, control, **kw):
            if self.live is not None:
                self.live.end()
                self.live = None  # the stage's own evaluation after training is not a step of the run

    return LiveTracking()
