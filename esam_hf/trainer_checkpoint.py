"""What `ESAMTrainer` adds to a Trainer checkpoint, ESAM's state (`esam_state.pt`: the SWP generator), and
errors that name the checkpoint when saving or loading one fails deep in torch or safetensors."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
from typing import Callable

import torch

from .esam import ESAM

ESAM_STATE_NAME = "esam_state.pt"


def save_esam_state(esam: ESAM, output_dir: str) -> None:
    torch.save(esam.state_dict(), os.path.join(output_dir, ESAM_STATE_NAME))


def load_esam_state(get_esam: Callable[[], ESAM], checkpoint: str) -> bool:
    """Load `checkpoint`'s ESAM state into `get_esam()`; False when the checkpoint has none."""
    path = os.path.join(checkpoint, ESAM_STATE_NAME)
    if not os.path.isfile(path):
        return False
    with naming_damaged_checkpoint(path, "ESAM state"):
        get_esam().load_state_dict(torch.load(path, weights_only=True))
    return True


@contextlib.contextmanager
def naming_full_disk(folder: str):
    """A full disk while saving the checkpoint `folder`: say so, and name the folder."""
    try:
        yield
    except Exception as e:  # torch (RuntimeError) and safetensors (SafetensorError) name neither disk nor file
        from .data.errors import is_disk_full

        if is_disk_full(e):
            raise OSError(errno.ENOSPC, f"No space left on device while saving {folder} ({e}). Free space "
                          "(or set save_total_limit), delete that incomplete checkpoint, and resume.") from e
        raise


@contextlib.contextmanager
def naming_damaged_checkpoint(path: str | None, what: str):
    """A truncated or corrupt checkpoint file fails deep in torch or safetensors with an error that
    names no file: say which checkpoint, and what to do."""
    try:
        yield
    except Exception as e:  # torch, safetensors and pickle each raise their own types
        if path is None:
            raise
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):
            # torch's message advises weights_only=False, which would run whatever the file holds; its middle
            # paragraph says what was refused.
            paragraphs = [part.strip() for part in str(e).split("\n\n") if part.strip()]
            detail = f" ({paragraphs[1]})" if len(paragraphs) > 2 else ""
            raise RuntimeError(
                f"refusing to load the {what} from {path}: it holds Python objects other than tensors and plain "
                f"values, which loading could run as code{detail}. Do not load it unless you made it yourself: "
                "delete that checkpoint folder and resume from an earlier one, or start over."
            ) from None
        raise RuntimeError(
            f"cannot load the {what} from {path}: {type(e).__name__}: {e}. If the checkpoint is damaged (e.g. a run "
            "killed while saving), delete that checkpoint folder and resume from an earlier one, or start over."
        ) from e
