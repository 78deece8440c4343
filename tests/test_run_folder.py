"""An output folder holds a run's files and the user's, and only the run's are ever deleted; a run killed
after its last checkpoint finishes as if it had never stopped; damaged records, states and locks say what
they are.

The references are independent of the code under test: the bytes of the user's files before and after, the
set of paths a fresh run writes into an empty folder, an uninterrupted run's weights and metrics, and a real
`kill -9` of a second process."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from esam_hf.cli import main as cli_main
from esam_hf.run_folder import LOCK_NAME, RunFolder, checkpoint_problem, claim_output_dir, read_record

TINY = ["--model_name", "cifar_resnet18", "--model_kwargs", '{"channels": [8, 16, 32, 64]}', "--use_cpu",
        "--disable_tqdm", "true", "--report_to", "none", "--per_device_train_batch_size", "16",
        "--dataset", "cifar10-subset", "--max_train_samples", "32", "--max_eval_samples", "16",
        "--learning_rate", "0.01"]
# 64 images in batches of 16: 4 steps an epoch, so step 6 ends mid-epoch (where the Trainer, resumed at its
# last step, would train a seventh).
LAST_CHECKPOINT_RUN = ["--max_train_samples", "64", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _train(out, *extra):
    cli_main(["train", "--output_dir", str(out), *TINY, *extra])


def _record(out):
    return json.loads((Path(out) / "esam_run.json").read_text())


def _tree(folder):
    """Every path under `folder` (links not followed) -> its bytes, its link target, or None for a folder."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            found[rel] = (f"-> {os.readlink(path)}" if path.is_symlink() else None if path.is_dir()
                          else path.read_bytes())
    return found


def _refused(capsys, out, *extra):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _train(out, *extra)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished run with two checkpoints, to copy (copies keep modification times, as a moved folder does)."""
    out = tmp_path_factory.mktemp("old") / "run"
    _train(out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    return out


def _copy(old_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(old_run, out, symlinks=True)
    return out


# --------------------------------------------------------------------------- #
# --overwrite_output_dir deletes only what a run of ours wrote
# --------------------------------------------------------------------------- #
def test_a_project_folder_with_run_like_names_is_never_cleared(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "runs" / "exp1").mkdir(parents=True)
    (project / "README.md").write_text("# my project\n")
    (project / "config.json").write_text('{"mine": true}')
    (project / "runs" / "exp1" / "events.out.tfevents.1").write_bytes(b"\x00my events")
    (project / "checkpoint-plan.txt").write_text("save every epoch")
    before = _tree(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--recipe", "demo", "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps",
                  "2", "--overwrite_output_dir", "--output_dir", str(project)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "holds no esam_run.json" in err and "Nothing was deleted" in err
    assert all(name in err for name in ("README.md", "config.json", "runs", "checkpoint-plan.txt"))
    assert _tree(project) == before  # byte-identical, and nothing added (no lock left behind)


def test_user_files_inside_an_old_runs_checkpoint_and_logs_folder_survive(old_run, tmp_path, capsys):
    out = _copy(old_run, tmp_path)
    (out / "checkpoint-1" / "notes.txt").write_text("why step 1 looked odd")
    (out / "runs" / "exp1").mkdir(parents=True)
    (out / "runs" / "exp1" / "events.out.tfevents.1").write_bytes(b"\x00mine")
    before = _tree(out)
    err = _refused(capsys, out, "--max_steps", "1", "--overwrite_output_dir")
    assert "checkpoint-1/notes.txt" in err and "runs (not written by the run)" in err
    assert _tree(out) == before


def test_user_files_named_like_run_files_beside_a_run_survive(old_run, tmp_path, capsys):
    out = _copy(old_run, tmp_path)
    (out / "checkpoint-ideas.txt").write_text("keep more checkpoints")
    (out / "model-1-of-2.safetensors").write_bytes(b"my own shard")
    before = _tree(out)
    err = _refused(capsys, out, "--max_steps", "1", "--overwrite_output_dir")
    assert "checkpoint-ideas.txt, model-1-of-2.safetensors (not written by the run)" in err
    assert _tree(out) == before


def test_links_inside_the_folder_are_never_followed_and_their_targets_untouched(old_run, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.copytree(old_run / "checkpoint-1", outside / "weights")
    (outside / "data.txt").write_text("precious")
    target_before = _tree(outside)
    out = _copy(old_run, tmp_path)
    # A link of the user's, and one where the run wrote a folder: the target holds the same file names.
    (out / "data").symlink_to(outside)
    shutil.rmtree(out / "checkpoint-1")
    (out / "checkpoint-1").symlink_to(outside / "weights", target_is_directory=True)
    before = _tree(out)
    err = _refused(capsys, out, "--max_steps", "1", "--overwrite_output_dir")
    assert "checkpoint-1 (now a link, where the run wrote a folder)" in err and "data (not written by the run)" in err
    assert _tree(out) == before and _tree(outside) == target_before


def test_overwriting_a_genuine_old_run_deletes_exactly_its_files(old_run, tmp_path):
    out = _copy(old_run, tmp_path)
    _train(out, "--max_steps", "1", "--save_strategy", "no", "--overwrite_output_dir")
    fresh = tmp_path / "fresh"
    _train(fresh, "--max_steps", "1", "--save_strategy", "no")
    # What is left is what the same run writes into an empty folder: every file of the old run is gone.
    assert set(_tree(out)) == set(_tree(fresh)) and not list(out.glob("checkpoint-*"))
    # ... and the new record accounts for every path in the folder.
    assert set(_record(out)["manifest"]) | {"esam_run.json"} == set(_tree(out))
    assert _record(out)["settings"]["training"]["max_steps"] == 1 and not (out / LOCK_NAME).exists()


def test_tensorboard_logs_are_the_runs_and_a_user_file_among_them_is_kept(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    _train(out, "--max_steps", "2", "--report_to", "tensorboard", "--logging_steps", "1")
    logs = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert logs and {str(p.relative_to(out)) for p in logs} <= set(_record(out)["manifest"])
    mine = logs[0].parent / "my_plot.png"
    mine.write_bytes(b"my plot")
    err = _refused(capsys, out, "--max_steps", "1", "--overwrite_output_dir")
    assert f"{mine.relative_to(out)} (not written by the run)" in err and all(p.is_file() for p in logs)
    mine.unlink()
    _train(out, "--max_steps", "1", "--overwrite_output_dir")
    assert not (out / "runs").exists()


def test_a_file_of_the_old_run_changed_by_the_user_is_refused_not_deleted(old_run, tmp_path, capsys):
    out = _copy(old_run, tmp_path)
    (out / "all_results.json").write_text('{"my": "edited results"}')
    os.utime(out / "checkpoint-2" / "optimizer.pt")  # a large file: told by its size and modification time
    before = _tree(out)
    err = _refused(capsys, out, "--max_steps", "1", "--overwrite_output_dir")
    assert "all_results.json, checkpoint-2/optimizer.pt (changed since the run wrote it)" in err
    assert _tree(out) == before


# --------------------------------------------------------------------------- #
# A run killed after its last checkpoint finishes without training
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _train(out, *LAST_CHECKPOINT_RUN)
    return out


def _assert_finished_as(out, reference):
    ours, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    record, expected = _record(out), _record(reference)
    assert record["status"] == "finished"
    for key in ("eval_loss", "eval_accuracy", "epoch"):
        assert record["metrics"][key] == expected["metrics"][key], key
    assert record["metrics"]["train_loss"] == pytest.approx(expected["metrics"]["train_loss"], rel=1e-12)
    assert (out / "README.md").is_file()
    assert not [p for p in _tree(out) if ".tmp" in p]
    assert not RunFolder(str(out), read_record(str(out))).contents().in_the_way  # every file is the run's


def test_a_run_stopped_after_its_last_checkpoint_finishes_without_training(uninterrupted, tmp_path):
    out = _copy(uninterrupted, tmp_path)
    record = _record(out)
    # What a run stopped after saving checkpoint-6 leaves: no final save, its record still says running.
    for path in out.iterdir():
        if path.is_file() and path.name not in ("esam_run.json", "timeline.json"):
            path.unlink()
    (out / "esam_run.json").write_text(json.dumps({**record, "status": "running", "metrics": None}))
    _train(out, *LAST_CHECKPOINT_RUN, "--resume_from_checkpoint", "last")
    _assert_finished_as(out, uninterrupted)


KILL_AFTER_CHECKPOINT_6 = """
import os, signal, sys
from esam_hf.trainer import ESAMTrainer
save = ESAMTrainer._save_checkpoint
def save_then_die(self, model, trial):
    save(self, model, trial)
    if self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
ESAMTrainer._save_checkpoint = save_then_die
from esam_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""
KILL_IN_FINAL_SAVE = """
import os, signal, sys
import transformers.modeling_utils
save = transformers.modeling_utils.safe_save_file
def die_mid_save(tensors, filename, metadata=None):
    folder = os.path.dirname(filename)
    if not os.path.basename(folder).startswith("checkpoint-"):  # the final save: leave what safetensors leaves
        with open(os.path.join(folder, ".tmpK1ll3d"), "wb") as f:
            f.write(bytes(2_800_000))
        os.kill(os.getpid(), signal.SIGKILL)
    return save(tensors, filename, metadata=metadata)
transformers.modeling_utils.safe_save_file = die_mid_save
from esam_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kill", [KILL_AFTER_CHECKPOINT_6, KILL_IN_FINAL_SAVE],
                         ids=["after_checkpoint", "in_final_save"])
def test_a_run_killed_at_its_end_finishes_on_resume_as_if_never_stopped(uninterrupted, tmp_path, kill):
    out = tmp_path / "run"
    command = [sys.executable, "-c", kill, "train", "--output_dir", str(out), *TINY, *LAST_CHECKPOINT_RUN]
    killed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _record(out)["status"] == "running" and (out / "checkpoint-6").is_dir()
    _train(out, *LAST_CHECKPOINT_RUN, "--resume_from_checkpoint", "last")
    _assert_finished_as(out, uninterrupted)
    # The killed run's files are all accounted for: replacing the run deletes every one of them.
    _train(out, "--max_steps", "1", "--save_strategy", "no", "--overwrite_output_dir")
    assert not list(out.glob("checkpoint-*"))


# --------------------------------------------------------------------------- #
# Damaged states and records, failed first steps, unreadable locks
# --------------------------------------------------------------------------- #
def test_a_trainer_state_that_is_json_but_not_a_state_makes_an_incomplete_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"]
    _train(out, *argv)
    (out / "esam_run.json").write_text(json.dumps({**_record(out), "status": "running"}))
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-2" / "trainer_state.json").write_text("[]")
    assert checkpoint_problem(str(out / "checkpoint-3")) == (
        "trainer_state.json is not a trainer state (it has no global_step, max_steps)")
    capsys.readouterr()
    _train(out, *argv, "--resume_from_checkpoint", "last")
    err = capsys.readouterr().err
    assert "checkpoint-3: trainer_state.json is not a trainer state" in err
    assert "checkpoint-2: trainer_state.json holds a JSON list, not a trainer state" in err
    assert _record(out)["status"] == "finished" and _record(out)["resumed_from"]["step"] == 1


@pytest.mark.parametrize("record", [{"status": "running"}, [], "not json"], ids=["no_settings", "a_list", "not_json"])
def test_a_record_that_is_not_ours_is_named_with_what_to_do(tmp_path, capsys, record):
    out = tmp_path / "run"
    out.mkdir()
    (out / "esam_run.json").write_text(record if isinstance(record, str) else json.dumps(record))
    for extra in (["--resume_from_checkpoint", "last"], ["--overwrite_output_dir"], []):
        err = _refused(capsys, out, "--max_steps", "1", *extra)
        assert f"{out / 'esam_run.json'} " in err and "is damaged or not the run record of esam-hf" in err
        assert "nothing was changed" in err and "choose another --output_dir" in err
    assert [p.name for p in out.iterdir()] == ["esam_run.json"]


def test_the_damaged_record_hint_offers_reproduce_only_what_it_has(tmp_path, capsys):
    from esam_hf.reproduce import main as reproduce

    (tmp_path / "sgd-seed0").mkdir()
    (tmp_path / "sgd-seed0" / "esam_run.json").write_text('{"status": ')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        reproduce(["--recipe", "demo", "--methods", "sgd", "--seeds", "0", "--output_dir", str(tmp_path), "--plots",
                   "false"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is damaged or not the run record" in err
    assert "--overwrite_output_dir" not in err  # reproduce has no such flag


def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_rerun(tmp_path, capsys, monkeypatch):
    from esam_hf.trainer import ESAMTrainer

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    out = tmp_path / "run"
    monkeypatch.setattr(ESAMTrainer, "training_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _train(out, "--max_steps", "2")
    monkeypatch.undo()
    assert _record(out)["status"] == "failed" and _record(out)["global_step"] == 0
    capsys.readouterr()
    _train(out, "--max_steps", "2")
    assert "replacing the run in" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    _train(fresh, "--max_steps", "2")
    assert set(_tree(out)) == set(_tree(fresh)) and _record(out)["status"] == "finished"
    assert "error" not in _record(out)


def test_a_failed_first_step_run_with_a_user_file_is_not_replaced(tmp_path, capsys, monkeypatch):
    from esam_hf.trainer import ESAMTrainer

    monkeypatch.setattr(ESAMTrainer, "training_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        _train(out, "--max_steps", "2")
    monkeypatch.undo()
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    err = _refused(capsys, out, "--max_steps", "2")
    assert "stopped before its first checkpoint (failed)" in err and _tree(out) == before


@pytest.mark.parametrize("content", ["", "garbage", "\x00\x01"], ids=["empty", "garbage", "binary"])
def test_an_unreadable_lock_says_so_and_names_the_file(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(content)
    with pytest.raises(ValueError) as error:
        claim_output_dir(str(out), {}, resume=None, overwrite=False)
    message = str(error.value)
    assert f"its lock file {out / LOCK_NAME} cannot be read" in message and "delete" in message
    assert "process 0" not in message and "None" not in message


def test_a_command_that_fails_before_writing_anything_leaves_no_folder_behind(tmp_path, capsys):
    """A data mistake surfaces only once the folder is claimed: the folders the claim made go with the lock; a
    folder that was there before stays."""
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "new" / "nested" / "run", tmp_path / "mine" / "run"):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["train", "--output_dir", str(out), *TINY, "--dataset", str(tmp_path / "no-such-data"),
                      "--max_steps", "1"])
        assert exit_.value.code == 2 and "no-such-data" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "run").exists()
