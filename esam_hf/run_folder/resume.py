"""Resuming a run: the checkpoints of its folder, which are complete (`checkpoint_problem`), which one to resume
(`resolve_checkpoint`), and whether it is the run's last step, so that resuming finishes without training
(`checkpoint_ends_run`)."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from typing import Any

from .record import PROG

# What a checkpoint needs to resume exactly: without the optimizer and scheduler the learning-rate
# schedule restarts at its peak with fresh momentum; without the ESAM state the SWP draws repeat.
CHECKPOINT_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "esam_state.pt")
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "adapter_model.safetensors", "adapter_model.bin")


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders of `output_dir`, newest (highest step) first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        step = name.removeprefix("checkpoint-")
        if name.startswith("checkpoint-") and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(step), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def _trainer_state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"holds a JSON {type(state).__name__}, not a trainer state"
    missing = [k for k in ("global_step", "max_steps") if not isinstance(state.get(k), int)]
    if missing or not isinstance(state.get("log_history", []), list):
        return f"is not a trainer state (it has no {', '.join(missing) or 'log_history list'})"
    return None


def checkpoint_problem(checkpoint: str) -> str | None:
    """Why `checkpoint` cannot resume a run exactly (a missing, empty, truncated or unparsable file), or None."""
    if not os.path.isdir(checkpoint):
        return "it is not a folder"
    names = set(os.listdir(checkpoint))
    missing = [n for n in CHECKPOINT_STATE if n not in names]
    if not names & set(CHECKPOINT_WEIGHTS):
        missing.insert(0, "the model weights (model.safetensors)")
    if missing:
        return f"it lacks {', '.join(missing)}"
    for name in sorted(names):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            continue
        if os.path.getsize(path) == 0:
            return f"{name} is empty"
        if name.endswith(".json"):
            try:
                with open(path) as f:
                    content = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return f"{name} is not valid JSON ({e})"
            problem = _trainer_state_problem(content) if name == "trainer_state.json" else None
            if problem:
                return f"{name} {problem}"
        elif name.endswith((".pt", ".pth", ".bin")):
            # torch.save writes a zip whose directory is at the end: a file cut short has none.
            if not zipfile.is_zipfile(path):
                return f"{name} is truncated or not a torch file"
    return None


def checkpoint_ends_run(checkpoint: str) -> bool:
    """Whether a complete `checkpoint` was saved at its run's last step (nothing is left to train)."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    return state["global_step"] >= state["max_steps"] > 0


def resolve_checkpoint(output_dir: str, requested: str | bool | None) -> str | None:
    """The checkpoint to resume: `requested` as given (checked), or for True the newest complete one in
    `output_dir`, saying which newer ones were skipped and why. Raises ValueError naming every problem."""
    if not requested:
        return None
    if requested is not True:
        problem = checkpoint_problem(requested)
        if problem:
            raise ValueError(f"--resume_from_checkpoint {requested}: {problem}, so the run cannot continue exactly "
                             "where it stopped. Resume from another checkpoint, or start over.")
        return requested
    skipped = []
    for checkpoint in checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for path, why in skipped:
                print(f"{PROG}: skipping {path}: {why} (a run killed while saving, or saved with --save_only_model); "
                      f"resuming from {checkpoint}. Delete the damaged folder to silence this.", file=sys.stderr)
            return checkpoint
        skipped.append((checkpoint, problem))
    if skipped:
        raise ValueError(f"--resume_from_checkpoint last: no checkpoint in {output_dir} can resume the run exactly ("
                         + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
                         + "). Start over with --overwrite_output_dir.")
    raise ValueError(f"--resume_from_checkpoint last: {output_dir} holds no checkpoint to resume (the run stopped "
                     "before its first save). Start over with --overwrite_output_dir.")
