"""No lost files and no mislabelled runs: output folders, locks, resumes and damaged checkpoints."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from esam_hf.cli import main as cli_main
from esam_hf.run_folder import LOCK_NAME, claim_output_dir

TINY = ["--model_name", "cifar_resnet18", "--model_kwargs", '{"channels": [8, 16, 32, 64]}', "--use_cpu",
        "--disable_tqdm", "true", "--report_to", "none", "--per_device_train_batch_size", "16",
        "--dataset", "cifar10-subset", "--max_train_samples", "32", "--max_eval_samples", "16", "--learning_rate", "0.01"]


def _train(out, *extra):
    cli_main(["train", "--output_dir", str(out), *TINY, *extra])


def _record(out):
    return json.loads((Path(out) / "esam_run.json").read_text())


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def _mark_killed(out):
    """What a run killed mid-training leaves: its record still says running."""
    record = _record(out)
    record["status"] = "running"
    (Path(out) / "esam_run.json").write_text(json.dumps(record))


def test_overwrite_deletes_nothing_but_a_run_and_only_once_the_new_run_is_built(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _train(out, "--max_steps", "1", "--save_strategy", "no")
    before = _files(out)
    # A mistake in the new command: the old run survives.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["train", "--output_dir", str(out), *TINY, "--max_steps", "1", "--overwrite_output_dir",
                  "--dataset", "cifar10-subsett"])
    assert "cifar10-subsett" in capsys.readouterr().err
    assert _files(out) == before
    # Files that are not a run's are never deleted: the overwrite is refused, naming them.
    (out / "notes.txt").write_text("mine")
    (out / "train.py").write_text("# mine")
    (out / "my_data").mkdir()
    (out / "my_data" / "train.parquet").write_bytes(b"x")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _train(out, "--max_steps", "1", "--overwrite_output_dir")
    assert exit_.value.code == 2
    assert "also holds my_data, notes.txt, train.py (not written by the run)" in capsys.readouterr().err
    assert _files(out) == {**before, "notes.txt": b"mine", "train.py": b"# mine", "my_data/train.parquet": b"x"}
    # Never the working directory.
    (out / "notes.txt").unlink()
    (out / "train.py").unlink()
    (out / "my_data" / "train.parquet").unlink()
    (out / "my_data").rmdir()
    monkeypatch.chdir(out)
    with pytest.raises(SystemExit):
        _train(".", "--max_steps", "1", "--overwrite_output_dir")
    assert "the working directory or the dataset" in capsys.readouterr().err
    assert _files(out) == before
    monkeypatch.chdir(tmp_path)
    _train(out, "--max_steps", "2", "--overwrite_output_dir", "--save_strategy", "no")
    assert _record(out)["settings"]["training"]["max_steps"] == 2 and not (out / LOCK_NAME).exists()


def test_a_claimed_folder_is_refused_to_a_second_run_and_a_dead_runs_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "run")
    claim = claim_output_dir(out, {}, resume=None, overwrite=False)
    with pytest.raises(ValueError, match="in use by another run"):
        claim_output_dir(out, {}, resume=None, overwrite=False)
    claim.release()
    assert not Path(out).exists()  # the claim made the folder and nothing was written: it goes with the claim
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(out).mkdir()
    Path(out, LOCK_NAME).write_text(f"{socket.gethostname()} {dead.pid}\n")  # left by a killed run
    claim_output_dir(out, {}, resume=None, overwrite=False).release()


def test_two_runs_started_together_into_one_new_folder_one_is_refused(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "esam_hf.cli", "train", "--output_dir", str(out), *TINY, "--max_steps", "1",
               "--save_strategy", "no", "--do_train"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another run" in refused or "already holds" in refused
    assert _record(out)["status"] == "finished"


def test_a_failed_first_run_is_recorded_and_the_advice_does_not_loop(tmp_path, capsys, monkeypatch):
    from esam_hf.trainer import ESAMTrainer

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    out = tmp_path / "run"
    step = ESAMTrainer.training_step
    # Fails at its second step, before its first checkpoint (a run that fails before its first step is replaced).
    monkeypatch.setattr(ESAMTrainer, "training_step",
                        lambda self, *a, **k: broken() if self.state.global_step == 1 else step(self, *a, **k))
    with pytest.raises(RuntimeError, match="boom"):
        _train(out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    monkeypatch.undo()
    assert _record(out)["status"] == "failed" and "boom" in _record(out)["error"] and _record(out)["global_step"] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _train(out, "--max_steps", "2")
    assert "stopped before its first checkpoint (failed). Start over with --overwrite_output_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--resume_from_checkpoint", "last")
    assert "holds no checkpoint to resume" in capsys.readouterr().err


def test_last_skips_a_damaged_newest_checkpoint_and_the_resume_is_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"]
    _train(out, *argv)
    _mark_killed(out)
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": ')  # killed while writing
    os.truncate(out / "checkpoint-2" / "rng_state.pth", 10)
    capsys.readouterr()
    _train(out, *argv, "--resume_from_checkpoint", "last")
    err = capsys.readouterr().err
    assert "skipping " in err and "checkpoint-3: trainer_state.json is not valid JSON" in err
    assert "checkpoint-2: rng_state.pth is truncated" in err
    record = _record(out)
    assert record["status"] == "finished" and record["resumed_from"]["step"] == 1
    assert record["resumed_from"]["checkpoint"].endswith("checkpoint-1")
    assert "training resumed from a checkpoint at step 1 of a esam run" in (out / "README.md").read_text()
    # An explicitly named damaged checkpoint is refused, naming the file.
    _mark_killed(out)
    os.truncate(out / "checkpoint-1" / "optimizer.pt", 100)
    with pytest.raises(SystemExit):
        _train(out, *argv, "--resume_from_checkpoint", str(out / "checkpoint-1"))
    assert "optimizer.pt is truncated" in capsys.readouterr().err


def test_a_checkpoint_without_optimizer_state_is_not_resumed_silently(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--save_only_model", "true"]
    _train(out, *argv)
    _mark_killed(out)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _train(out, *argv, "--resume_from_checkpoint", "last")
    err = capsys.readouterr().err
    assert "lacks optimizer.pt, scheduler.pt, esam_state.pt" in err and "Start over" in err
    assert _record(out)["status"] == "running"


def test_a_full_disk_while_saving_a_checkpoint_says_so_and_names_the_folder(tmp_path, monkeypatch):
    import torch

    from esam_hf.trainer import ESAMTrainer

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):  # what torch raises when a write comes up short
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1426")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"No space left on device.*checkpoint-1"):
        _train(out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    assert ESAMTrainer  # the Trainer layer translates the error
    assert _record(out)["status"] == "failed"


def test_push_to_hub_offline_fails_up_front_naming_the_flag(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        _train(out, "--max_steps", "1", "--push_to_hub", "--hub_model_id", "me/model")
    assert exit_.value.code == 2
    assert "--push_to_hub: offline mode is on" in capsys.readouterr().err and not out.exists()
