"""What a new user meets first on the command line: data mistakes as one line (the traceback on request),
CPU threads chosen from the cores free, and example scripts that never train a model under another
model's recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esam_hf import cli
from esam_hf.data import DataError
from esam_hf.recipes import example_arguments, example_recipe

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- #
# Data mistakes: `esam-hf CMD: error: message`, status 2; the traceback under --debug / ESAM_HF_DEBUG=1
# --------------------------------------------------------------------------- #
def _train(tmp_path, dataset, *prefix):
    return cli.main([*prefix, "train", "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"),
                     "--max_steps", "1", "--use_cpu"])


@pytest.mark.parametrize("dataset, says", [
    ("{tmp}/no-such-folder", "is neither a local directory nor a dataset reachable on the Hugging Face Hub"),
    ("someone/not-a-cached-dataset", "Offline mode is on"),  # conftest sets HF_HUB_OFFLINE=1
    ("{tmp}/empty", "doesn't contain any data files"),  # datasets' own EmptyDatasetError
])
def test_a_data_mistake_is_one_line_with_status_2(tmp_path, capsys, monkeypatch, dataset, says):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    (tmp_path / "empty").mkdir()
    dataset = dataset.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _train(tmp_path, dataset)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("esam-hf train: error: "))
    assert says in message
    assert f"{cli.DEBUG_ENV}=1 shows the traceback" in err


def test_the_traceback_under_debug_or_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(DataError, match="no-such-folder"):
        _train(tmp_path, tmp_path / "no-such-folder", "--debug")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(DataError, match="no-such-folder"):
        _train(tmp_path, tmp_path / "no-such-folder")


def test_other_errors_keep_their_traceback(monkeypatch):
    """Only data mistakes are shortened: a bug must still show where it is."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def broken(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli.run_command(broken, [], "esam-hf train")


def test_help_says_how_to_see_the_traceback(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: esam-hf [--debug] COMMAND" in text and f"--debug (or {cli.DEBUG_ENV}=1)" in text
    assert "OMP_NUM_THREADS" in text


# --------------------------------------------------------------------------- #
# CPU threads: one per core left free by other work, unless the user chose
# --------------------------------------------------------------------------- #
@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_busy_cores_sees_a_process_spinning_on_a_core():
    core = min(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                               preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    try:
        import time

        time.sleep(0.5)  # past the interpreter's start-up
        busy = cli.busy_cores({core}, seconds=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.8 <= busy <= 1.0


@pytest.mark.parametrize("busy, cores, expected", [(0.0, 2, 2), (1.2, 2, 1), (2.0, 2, 1), (5.0, 2, 1), (3.4, 8, 5)])
def test_threads_follow_the_cores_left_free(torch_threads, monkeypatch, busy, cores, expected):
    for name in cli.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(cli, "busy_cores", lambda cores, seconds=0.3: busy)
    torch.set_num_threads(cores)
    said = []
    assert cli.choose_cpu_threads(said.append) == expected == torch.get_num_threads()
    assert len(said) == (expected < cores)  # said once when it lowers the count, never otherwise
    if said:
        assert f"using {expected} CPU thread" in said[0] and "OMP_NUM_THREADS" in said[0]


def test_a_command_run_in_process_leaves_torchs_threads_as_they_were(tmp_path, torch_threads, monkeypatch, capsys):
    for name in cli.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "busy_cores", lambda cores, seconds=0.3: float(len(cores)))  # every core busy
    torch.set_num_threads(2)
    seen = []
    monkeypatch.setattr("esam_hf.run.main", lambda argv: seen.append(torch.get_num_threads()))
    assert cli.main(["train", "--output_dir", str(tmp_path)]) == 0
    assert seen == [1] and torch.get_num_threads() == 2
    assert "using 1 CPU thread" in capsys.readouterr().err


def test_a_users_thread_count_is_kept(torch_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cli, "busy_cores", lambda cores, seconds=0.3: float(len(cores)))
    torch.set_num_threads(2)
    said = []
    assert cli.choose_cpu_threads(said.append) is None and torch.get_num_threads() == 2 and not said


# --------------------------------------------------------------------------- #
# Example scripts: the recipe of the model named, else `generic`, never another model's
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dataset, model, fallback, expected", [
    (None, None, "imagenet-resnet50", "imagenet-resnet50"),
    (None, "resnet101", "imagenet-resnet50", "imagenet-resnet101"),
    ("my/dogs", "resnet50", "imagenet-resnet50", "imagenet-resnet50"),  # the model's recipe, on the named data
    ("cifar10", "vit_tiny_patch16_224", "imagenet-resnet50", "generic"),
    ("cifar100", "cifar_wrn28_10", "cifar10-resnet18", "cifar100-wrn28-10"),
    ("cifar10", "convnext_atto", "cifar10-resnet18", "generic"),
])
def test_example_recipe_is_the_named_models_or_generic(dataset, model, fallback, expected):
    assert example_recipe(dataset, model, fallback) == expected


def test_generic_learning_rate_follows_the_batch(capsys):
    from esam_hf.run import parse

    argv = ["--model_name", "vit_tiny_patch16_224", "--dataset", "cifar10", "--per_device_train_batch_size", "32",
            "--gradient_accumulation_steps", "2", "--output_dir", "x"]
    argv, recipe = example_arguments(argv, "imagenet-resnet50", "train_imagenet.py")
    assert recipe == "generic" and "the 'generic' recipe, at learning rate 0.025" in capsys.readouterr().err
    recipe_args, _, model, data, training = parse(argv, prog="train_imagenet.py", default_recipe=recipe,
                                                  defaults={"dataset": "imagenet"})
    assert (recipe_args.recipe, model.model_name, data.dataset) == ("generic", "vit_tiny_patch16_224", "cifar10")
    assert training.learning_rate == pytest.approx(0.1 * 64 / 256)  # 0.1 per 256 images, global batch 32 x 2
    assert training.optim == "sgd" and training.num_train_epochs == 100
    # A learning rate on the command line is the user's.
    argv, _ = example_arguments(["--model_name", "vit_tiny_patch16_224", "--learning_rate", "0.3"], "imagenet-resnet50", "p")
    assert argv.count("--learning_rate") == 1


def test_train_imagenet_example_labels_an_unknown_model_generic(tmp_path):
    """The example script itself, as a user runs it, on a timm ViT it has no recipe for."""
    out = tmp_path / "vit"
    kwargs = json.dumps({"img_size": 32, "patch_size": 8, "depth": 2, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}})
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_imagenet.py"), "--model_name", "vit_tiny_patch16_224",
         "--model_kwargs", kwargs, "--dataset", "cifar10-subset", "--per_device_train_batch_size", "8", "--max_steps",
         "1", "--max_train_samples", "32", "--max_eval_samples", "16", "--output_dir", str(out), "--use_cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "esam_run.json").read_text())
    assert record["recipe"] == "generic"
    assert record["settings"]["training"]["learning_rate"] == pytest.approx(0.1 * 8 / 256)
    card = (out / "README.md").read_text()
    assert "| recipe | generic |" in card and "imagenet-resnet50" not in card
