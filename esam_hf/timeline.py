"""Training time without evaluation: a per-epoch timeline (`timeline.json`) in the run's output folder, and
the throughput read back from it."""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback

from .run_folder import read_json, write_json

TIMELINE = "timeline.json"
_EVAL_KEYS = ("eval_accuracy", "eval_top5_accuracy", "eval_loss")


def _clock() -> float:
    if torch.cuda.is_available():  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()
    return time.perf_counter()


class TimelineCallback(TrainerCallback):
    """Writes `timeline.json`: per epoch the step, cumulative training seconds, mean train loss and
    eval metrics. The clock runs from each epoch's start to its end, so evaluation and checkpoints
    are not counted. On resume, entries after the checkpoint's step are dropped (that work is redone)
    and the clock continues from the last entry kept."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, train_dataloader=None, eval_dataloader=None, **kwargs):
        saved = read_json(self.path, {}).get("epochs", [])
        self.epochs = [e for e in saved if e["step"] <= state.global_step]  # state is the checkpoint's by now
        self.seconds = self.epochs[-1]["train_seconds"] if self.epochs else 0.0
        self.train_samples = len(train_dataloader.dataset) if train_dataloader is not None else None
        self.last_logged = state.global_step

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.loss_sum, self.loss_steps = 0.0, 0
        self.start = _clock()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds += _clock() - self.start
        self.epochs.append({"epoch": round(state.epoch, 4), "step": state.global_step, "train_seconds": self.seconds})
        control.should_log = True  # a loss log at every epoch end, so no log spans two epochs
        self._fill_loss(args, state)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # the mean loss of the steps since the previous log
            steps = state.global_step - self.last_logged
            self.loss_sum, self.loss_steps = self.loss_sum + logs["loss"] * steps, self.loss_steps + steps
            self.last_logged = state.global_step
            self._fill_loss(args, state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        entry = self.epochs[-1] if self.epochs else None
        if entry and entry["step"] == state.global_step and "eval_accuracy" not in entry:
            entry.update({k: v for k, v in (metrics or {}).items() if k in _EVAL_KEYS})
            self._write(state)

    def _fill_loss(self, args, state):
        # The epoch's loss is complete once every step up to its end has been logged.
        entry = self.epochs[-1] if self.epochs else None
        if entry and entry["step"] == self.last_logged == state.global_step and self.loss_steps:
            entry["train_loss"] = self.loss_sum / self.loss_steps
        self._write(state)

    def _write(self, state):
        if state.is_world_process_zero:
            write_json(self.path, {"train_samples": self.train_samples,
                                   "epochs": self.epochs})


def training_throughput(output_dir: str, metrics: dict | None = None) -> tuple[float | None, float | None]:
    """(training seconds, images/s) of a run, evaluation and checkpoints excluded, from its timeline;
    without one, the Trainer's own numbers (which include them)."""
    timeline = read_json(os.path.join(output_dir, TIMELINE), {"epochs": []})
    epochs = timeline["epochs"]
    if epochs and timeline.get("train_samples") and epochs[-1]["train_seconds"] > 0:
        seconds = epochs[-1]["train_seconds"]
        return seconds, timeline["train_samples"] * epochs[-1]["epoch"] / seconds
    metrics = metrics or {}
    return metrics.get("train_runtime"), metrics.get("train_samples_per_second")
