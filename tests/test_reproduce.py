"""`esam-hf reproduce` and `esam-hf landscape` end to end, at a CPU size (the demo recipe: a
quarter-width ResNet-18 on the CIFAR-10 subset shipped in the package, 128 images, one epoch).

The checks compare against facts the code under test does not compute itself: the demo recipe's
published lr and batch, the Trainer's own scheduler and loss bookkeeping, PNG signatures, a fresh
evaluation of the reloaded model, file modification times."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from esam_hf.reproduce import batch_schedule, main, plan

METHODS = ("sgd", "sam", "esam")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _argv(out, *extra):
    return ["--recipe", "demo", "--num_train_epochs", "1", "--seeds", "0", "--max_train_samples", "128",
            "--max_eval_samples", "64", "--batch_size", "32", "--output_dir", str(out), "--logging_steps", "1", *extra]


def _cut_off(run):
    """As if the run had been killed after its last checkpoint: not finished, no final results."""
    record = _read(run / "esam_run.json")
    (run / "esam_run.json").write_text(json.dumps({**record, "status": "running"}))
    os.remove(run / "all_results.json")


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    results = main(_argv(out))
    return out, results


# --------------------------------------------------------------------------- #
# Planning (no training)
# --------------------------------------------------------------------------- #
def test_batch_schedule_linear_scaling_rule():
    # cifar10-resnet18 is published as batch 128, lr 0.05 (the authors' script).
    assert batch_schedule("cifar10-resnet18", None) == (128, 0.05, 0.0)
    assert batch_schedule("cifar10-resnet18", 128) == (128, 0.05, 0.0)
    batch, lr, warmup = batch_schedule("cifar10-resnet18", 512)
    assert (batch, warmup) == (512, 0.05) and lr == pytest.approx(0.2)
    batch, lr, warmup = batch_schedule("cifar10-resnet18", 64)
    assert (batch, warmup) == (64, 0.0) and lr == pytest.approx(0.025)


def test_passthrough_flags_reach_every_run_but_keep_each_method_itself(tmp_path):
    opts, runs = plan(["--recipe", "cifar10-resnet18", "--methods", "sgd,sam,esam,esam_warmup", "--output_dir",
                       str(tmp_path), "--esam_rho", "0.1", "--esam_gamma", "0.3", "--model_kwargs", '{"drop_rate": 0.1}'])
    args = {m: runs[m, 0] for m in opts.method_list}
    training = {m: a[2] for m, a in args.items()}
    assert all(json.loads(a[0].model_kwargs) == {"drop_rate": 0.1} for a in args.values())
    assert training["sgd"].esam_rho == 0.0  # still SGD
    assert (training["sam"].esam_rho, training["sam"].esam_beta, training["sam"].esam_gamma) == (0.1, 1.0, 1.0)  # still SAM
    assert (training["esam"].esam_rho, training["esam"].esam_beta, training["esam"].esam_gamma) == (0.1, 0.6, 0.3)
    assert training["esam"].esam_gamma_warmup == 0.0 and training["esam_warmup"].esam_gamma_warmup == 0.3
    assert training["esam"].output_dir == os.path.join(str(tmp_path), "esam-seed0")
    assert training["esam"].per_device_train_batch_size == 128 and training["esam"].num_train_epochs == 200


@pytest.mark.parametrize("argv, match", [
    (["--methods", "sgd,adam"], "--methods: unknown adam"),
    (["--methods", ","], "--methods: none given"),
    (["--seeds", ","], "--seeds must list distinct integers"),
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--batch_size", "0"], "--batch_size must be an integer >= 1"),
    (["--num_train_epochs", "0"], "num_train_epochs must be a finite number > 0"),
    (["--landscape", "--grid", "4"], "--grid must be an odd integer >= 3"),
    (["--landscape", "--samples", "0"], "--samples must be an integer >= 1"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--recipe", "demo", "--output_dir", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, match", [
    (["--seed", "3"], "--seed: reproduce trains every seed of --seeds"),
    (["--epochs", "3"], "unknown option --epochs"),
    (["--output-dirr", "x"], "did you mean --output-dir"),
])
def test_flags_outside_the_convention_exit_with_a_hint(tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit):
        main(["--recipe", "demo", "--output_dir", str(tmp_path / "out"), *argv])
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- #
# One CPU-sized reproduction, shared by the tests below
# --------------------------------------------------------------------------- #
def test_batch_other_than_recipe_halves_lr(reproduced):
    out, _ = reproduced
    for method in METHODS:
        state = _read(out / f"{method}-seed0" / "trainer_state.json")
        # demo recipe: lr 0.05 at batch 64 -> 0.025 at batch 32; the first step's lr is the peak (no warm-up)
        assert state["log_history"][0]["learning_rate"] == pytest.approx(0.025)
        assert state["train_batch_size"] == 32


def test_results_tables_and_plots(reproduced, capsys):
    out, results = reproduced
    on_disk = _read(out / "results.json")
    assert set(on_disk["methods"]) == set(METHODS)
    assert on_disk["methods"]["sgd"]["images_per_s_vs_sgd"] == pytest.approx(1.0)
    for method in METHODS:
        final = _read(out / f"{method}-seed0" / "all_results.json")
        summary = on_disk["methods"][method]
        assert summary["top1_mean"] == pytest.approx(final["eval_accuracy"]) and summary["top1_std"] == 0.0
        # images/s = 128 images over the measured training seconds, which exclude evaluation, so they
        # cannot exceed the Trainer's own runtime (which includes the epoch-end evaluation)
        assert 0 < summary["train_seconds"] <= final["train_runtime"]
        assert summary["images_per_s"] == pytest.approx(128 / summary["train_seconds"])
    table = (out / "results.md").read_text()
    assert all(f"| {m} | 1 |" in table for m in METHODS)
    for name in on_disk["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        with Image.open(out / name) as image:
            image.verify()


def test_results_rewritten_from_the_records_alone_match_and_name_no_local_path(reproduced, tmp_path):
    import importlib.util
    import pathlib

    out, _ = reproduced
    copy = tmp_path / "copy"
    for method in METHODS:  # records only: no weights, no checkpoints
        (copy / f"{method}-seed0").mkdir(parents=True)
        for name in ("esam_run.json", "timeline.json", "all_results.json"):
            shutil.copy(out / f"{method}-seed0" / name, copy / f"{method}-seed0" / name)
    shutil.copy(out / "results.json", copy / "results.json")
    for method in METHODS:  # as if trained on a local folder
        record = _read(copy / f"{method}-seed0" / "esam_run.json")
        record["settings"]["data"]["dataset"] = str(tmp_path / "private" / "my-cifar")
        (copy / f"{method}-seed0" / "esam_run.json").write_text(json.dumps(record))
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "rewrite_results.py"
    spec = importlib.util.spec_from_file_location("rewrite_results", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(copy)])
    rewritten, original = _read(copy / "results.json"), _read(out / "results.json")
    assert rewritten["methods"] == original["methods"]
    table = (copy / "results.md").read_text()
    assert "on my-cifar," in table and str(tmp_path) not in table and str(tmp_path) not in json.dumps(rewritten)
    assert (out / "results.md").read_text().split("\n")[2:] == table.split("\n")[2:]  # the same rows


def test_figures_redrawn_from_results_and_landscape_json(reproduced, tmp_path):
    import importlib.util
    import pathlib

    out, _ = reproduced
    shutil.copy(out / "results.json", tmp_path / "results.json")
    grid = [-1.0, 0.0, 1.0]  # a landscape.json of the earliest version: its 2-D axes were "alphas" and "betas"
    (tmp_path / "landscape.json").write_text(json.dumps({"models": {name: {
        "landscape_1d": {"alphas": grid, "losses": [2.0 * k, 1.0 * k, 2.0 * k]}, "top_hessian_eigenvalue": 5.0 * k,
        "landscape_2d": {"alphas": grid, "betas": grid, "losses": [[3.0, 2.0, 3.0], [2.0, 1.0, 2.0], [3.0, 2.0, 3.0]]}}
        for name, k in (("sgd", 1), ("esam", 2))}}))
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "rewrite_results.py"
    spec = importlib.util.spec_from_file_location("rewrite_results", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    drawn = tool.main([str(tmp_path), "--figures_only"])
    names = {"accuracy_vs_epoch.png", "accuracy_vs_time.png", "train_loss.png", "landscape_1d.png", "landscape_2d.png"}
    assert {os.path.basename(p) for p in drawn} == names
    for name in names:
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


def test_timeline_one_entry_per_epoch_matches_trainer(reproduced):
    out, _ = reproduced
    for method in METHODS:
        run = out / f"{method}-seed0"
        timeline, final = _read(run / "timeline.json"), _read(run / "all_results.json")
        assert timeline["train_samples"] == 128 and len(timeline["epochs"]) == 1
        entry = timeline["epochs"][0]
        assert entry["epoch"] == 1.0 and entry["step"] == 4  # 128 images / batch 32
        # The Trainer's whole-run mean loss and final evaluation, for a one-epoch run
        assert entry["train_loss"] == pytest.approx(final["train_loss"])
        assert entry["eval_accuracy"] == pytest.approx(final["eval_accuracy"])


def test_saved_models_reload_with_cards(reproduced):
    import esam_hf.models  # noqa: F401  (registers the CIFAR backbones)
    from transformers import AutoModelForImageClassification

    from esam_hf.data import build_datasets, resolve_dataset

    out, _ = reproduced
    cards = {"sgd": "rho = 0", "sam": "beta = gamma = 1", "esam": "gamma-fraction of the batch"}
    for method in METHODS:
        run = out / f"{method}-seed0"
        assert cards[method] in (run / "README.md").read_text()
        model = AutoModelForImageClassification.from_pretrained(run).eval()
        # Re-evaluate the reloaded model on the same 64 test images: it must be the evaluated model.
        data = build_datasets(resolve_dataset("cifar10-subset"), dict(model.config.pretrained_cfg), train=False,
                              max_eval_samples=64, seed=0)
        batch = data.collator([data.eval_dataset[i] for i in range(len(data.eval_dataset))])
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
        assert accuracy == pytest.approx(_read(run / "all_results.json")["eval_accuracy"])


def test_rerun_skips_and_missing_results_resume_from_checkpoint(reproduced, capsys):
    out, _ = reproduced
    weights = {m: os.path.getmtime(out / f"{m}-seed0" / "model.safetensors") for m in METHODS}
    capsys.readouterr()
    main(_argv(out))
    printed = capsys.readouterr().out
    assert all(f"{m}-seed0: skip (finished, same settings)" in printed for m in METHODS)
    assert f"[reproduce] run 1 of {len(METHODS)}: " in printed and "0 run(s) trained" in printed
    assert all(os.path.getmtime(out / f"{m}-seed0" / "model.safetensors") == weights[m] for m in METHODS)

    card = (out / "sgd-seed0" / "README.md").read_text()
    (out / "sgd-seed0" / "README.md").unlink()  # a lost card is written again, the same, on the next run
    main(_argv(out))
    assert "sgd-seed0: its model card was missing: written again" in capsys.readouterr().out
    assert (out / "sgd-seed0" / "README.md").read_text() == card

    _cut_off(out / "esam-seed0")
    main(_argv(out))
    printed = capsys.readouterr().out
    assert "esam-seed0: resume from checkpoint-4" in printed and "sgd-seed0: skip" in printed
    state = _read(out / "esam-seed0" / "trainer_state.json")
    assert state["global_step"] == 4 and len(_read(out / "esam-seed0" / "timeline.json")["epochs"]) == 1
    assert os.path.isfile(out / "esam-seed0" / "all_results.json")


def test_resume_mid_run_continues_timeline(tmp_path, capsys):
    """Two epochs of SGD, then cut back to the epoch-1 checkpoint: the resumed run redoes epoch 2 only
    and its clock continues from epoch 1's."""
    argv = ["--recipe", "demo", "--methods", "sgd", "--num_train_epochs", "2", "--seeds", "0", "--max_train_samples", "64",
            "--max_eval_samples", "32", "--batch_size", "32", "--output_dir", str(tmp_path), "--logging_steps", "1"]
    main(argv)
    run = tmp_path / "sgd-seed0"
    first = _read(run / "timeline.json")["epochs"]
    assert [e["step"] for e in first] == [2, 4]
    shutil.rmtree(run / "checkpoint-4")
    _cut_off(run)
    capsys.readouterr()
    main(argv)
    assert "sgd-seed0: resume from checkpoint-2" in capsys.readouterr().out
    second = _read(run / "timeline.json")["epochs"]
    assert [e["step"] for e in second] == [2, 4]
    assert second[0] == first[0]  # the checkpointed epoch is kept as it was
    assert second[1]["train_seconds"] > second[0]["train_seconds"]
    steps = [h["step"] for h in _read(run / "trainer_state.json")["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4]  # epoch 1's logs from the checkpoint, then epoch 2's, each once


def test_landscape_after_reproduce_takes_the_landscape_options(reproduced):
    out, _ = reproduced
    before = {m: os.path.getmtime(out / f"{m}-seed0" / "model.safetensors") for m in METHODS}
    results = main(_argv(out, "--landscape", "--samples", "16", "--grid", "3", "--hessian_max_iters", "2",
                         "--hessian_tol", "0.5", "--no_2d"))
    on_disk = _read(out / "landscape" / "landscape.json")
    assert results["landscape"]["hessian_max_iters"] == on_disk["hessian_max_iters"] == 2
    assert on_disk["hessian_tol"] == 0.5
    assert set(on_disk["models"]) == set(METHODS)
    for entry in on_disk["models"].values():
        assert entry["landscape_1d"]["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]  # 2 * grid - 1 points
        assert "landscape_2d" not in entry and entry["hessian_iterations"] <= 2
    assert (out / "landscape" / "landscape_1d.png").is_file() and not (out / "landscape" / "landscape_2d.png").exists()
    assert before == {m: os.path.getmtime(out / f"{m}-seed0" / "model.safetensors") for m in METHODS}  # not retrained


def test_runs_of_one_seed_start_from_the_same_weights(reproduced):
    out, results = reproduced
    checksums = {m: _read(out / f"{m}-seed0" / "esam_run.json")["initial_weights_sha256"] for m in METHODS}
    assert len(set(checksums.values())) == 1 and len(checksums["sgd"]) == 64
    assert {results["runs"][m]["0"]["initial_weights_sha256"] for m in METHODS} == set(checksums.values())


def test_a_rerun_with_other_settings_is_refused_not_reused(reproduced, capsys):
    out, _ = reproduced
    before = {m: os.path.getmtime(out / f"{m}-seed0" / "esam_run.json") for m in METHODS}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(_argv(out, "--num_train_epochs", "2"))
    assert "sgd-seed0 was trained with other settings (training.num_train_epochs: 1.0 -> 2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_argv(out, "--learning_rate", "0.01"))
    assert "training.learning_rate: 0.025 -> 0.01" in capsys.readouterr().err
    assert {m: os.path.getmtime(out / f"{m}-seed0" / "esam_run.json") for m in METHODS} == before


def test_missing_matplotlib_is_found_before_training(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match="pip install 'esam-hf\\[plots\\]'"):
        main(_argv(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_finished_run_without_evaluation_is_not_called_diverged():
    from esam_hf.reproduce import markdown, summarize

    run = {"status": "finished", "accuracy": None, "train_seconds": 10.0, "images_per_s": 100.0}
    table = markdown(summarize({"sgd": {0: run}, "sam": {0: {**run, "status": "diverged"}}}), "header")
    assert "| sgd | 1 | not evaluated | - | 10.0 | 100.0 | 1.00 |" in table
    assert "| sam | 0 (1 diverged) | diverged |" in table
