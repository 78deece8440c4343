"""Faults while a run saves or resumes are errors that name the file: a full disk under torch or safetensors,
and a checkpoint file holding more than tensors (which must never run)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from esam_hf.cli import main as cli_main

TINY = ["--model_name", "cifar_resnet18", "--model_kwargs", '{"channels": [8, 16, 32, 64]}', "--use_cpu",
        "--disable_tqdm", "true", "--report_to", "none", "--per_device_train_batch_size", "16",
        "--dataset", "cifar10-subset", "--max_train_samples", "32", "--max_eval_samples", "16", "--learning_rate", "0.01"]
# What safetensors raised when a real (tmpfs) disk filled up under save_file, word for word.
SAFETENSORS_DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _train(out, *extra):
    return cli_main(["train", "--output_dir", str(out), *TINY, *extra])


def test_a_full_disk_under_safetensors_names_the_checkpoint(tmp_path, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_DISK_FULL)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"No space left on device while saving .*checkpoint-1 \(Error while serializing"):
        _train(out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")


class _RunsCode:
    """A pickle that would create `marker` when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_tampered_rng_state_is_refused_naming_the_file_and_never_runs(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "ran"
    argv = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2"]
    _train(out, *argv)
    # As a run killed during step 3: its record says running, and checkpoint-2 is the newest.
    shutil.rmtree(out / "checkpoint-3")
    record = json.loads((out / "esam_run.json").read_text())
    (out / "esam_run.json").write_text(json.dumps({**record, "status": "running"}))
    rng = out / "checkpoint-2" / "rng_state.pth"
    torch.save({"python": _RunsCode(marker)}, rng)
    with pytest.raises(RuntimeError) as error:
        _train(out, *argv, "--resume_from_checkpoint", "last")
    message = str(error.value)
    assert f"refusing to load the random-number state from {rng}" in message
    assert "could run as code" in message and "weights_only=False" not in message  # no advice to run it
    assert not marker.exists()


def test_a_full_disk_while_writing_the_cifar_cache_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    from esam_hf.data import build_datasets, resolve_dataset

    cache = tmp_path / "cache"
    monkeypatch.setenv("ESAM_HF_CACHE", str(cache))

    def disk_full(obj, f, *args, **kwargs):  # what torch raised when a real (tmpfs) disk filled up, word for word
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as error:
        build_datasets(resolve_dataset("cifar10-subset"), max_train_samples=20, max_eval_samples=10)
    message = str(error.value)
    assert "No space left on device while writing the decoded CIFAR cache" in message
    assert f"in {cache}." in message and "ESAM_HF_CACHE" in message
    assert list(Path(cache).iterdir()) == []  # the partial file is gone
