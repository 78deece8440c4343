"""End to end: train a few steps through the CLI pipeline, save, reload with the Auto classes
and `pipeline`, and compare with the in-memory model on a real CIFAR-10 photo."""

import json
import re

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from esam_hf.cli import main as cli_main
from esam_hf.run import DataArguments, ModelArguments, make_trainer, train_image_classifier
from esam_hf.trainer import ESAMTrainingArguments



def test_train_save_reload_pipeline_and_card(tmp_path, request):
    out = tmp_path / "model"
    args = ESAMTrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=32, learning_rate=0.05, optim="sgd",
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, esam_rho=0.1, esam_beta=0.5,
        esam_gamma=0.5, seed=0,
    )
    model_args = ModelArguments("cifar_resnet18", model_kwargs='{"channels": [8, 16, 32, 64]}')
    data_args = DataArguments("cifar10-subset", max_train_samples=96, max_eval_samples=40)
    metrics = train_image_classifier(model_args, data_args, args, recipe="test-recipe")
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_top5_accuracy" in metrics

    card = (out / "README.md").read_text()
    for needle in ["- esam", "- sam", "- timm", "- image-classification", "cifar_resnet18", "cifar10-subset",
                   "| 0.1 | 0.5 | 0.5 | False | clean |", "test-recipe", "eval_accuracy", "du2022efficient",
                   "SGD (momentum 0.9)", "40 of the 1000"]:
        assert needle in card, needle
    assert (out / "preprocessor_config.json").is_file()

    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert reloaded.config.id2label[3] == "cat"

    cifar_dir = request.getfixturevalue("cifar_dir")  # skips here, after the checks above, without the data
    photo = datasets.load_dataset(str(cifar_dir), split="test")[123]["img"]
    # Independent in-memory reference: the trained weights as saved, fed by the training pipeline's eval transform.
    trainer = make_trainer(model_args, data_args, ESAMTrainingArguments(output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none"))
    trainer.model.load_state_dict(reloaded.state_dict())
    mean = torch.tensor(trainer.model.config.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(trainer.model.config.pretrained_cfg["std"]).view(3, 1, 1)
    x = (torch.from_numpy(np.array(photo.convert("RGB"))).permute(2, 0, 1).float() / 255 - mean) / std
    with torch.no_grad():
        logits = trainer.model.eval()(pixel_values=x[None]).logits[0]
        assert torch.allclose(processor(photo, return_tensors="pt")["pixel_values"][0], x, atol=1e-5)
    expected = reloaded.config.id2label[int(logits.argmax())]
    result = pipeline("image-classification", model=str(out), device="cpu")(photo, top_k=3)
    assert result[0]["label"] == expected
    assert abs(result[0]["score"] - float(logits.softmax(-1).max())) < 1e-4


def test_cli_train_recipe_with_optimizer_baseline(tmp_path, capsys):
    out = tmp_path / "sgd"
    cli_main(["train", "--recipe", "demo", "--optimizer", "sgd", "--output_dir", str(out), "--max_steps", "2",
              "--max_train_samples", "64", "--max_eval_samples", "32", "--use_cpu", "--disable_tqdm", "true",
              "--save_strategy", "no", "--eval_strategy", "no"])
    printed = capsys.readouterr().out
    assert "| demo (sgd) |" in printed and "| top-1 % |" in printed
    accuracy = json.loads((out / "all_results.json").read_text())["eval_accuracy"]
    assert f"| {100 * accuracy:.2f} |" in printed  # in percent, as the README's tables
    assert "***** all metrics *****" not in printed  # one results block, not the Trainer's as well
    # images/s of training alone, as reproduce reports it: 2 steps x 64 images over the clocked seconds, which
    # leave out evaluation and so are within the Trainer's runtime (evaluation included)
    timeline = json.loads((out / "timeline.json").read_text())
    seconds = timeline["epochs"][-1]["train_seconds"]
    row = next(line for line in printed.splitlines() if line.startswith("| demo (sgd) |")).split("|")
    assert float(row[-3]) == pytest.approx(128 / seconds, rel=1e-3) and float(row[-2]) == pytest.approx(seconds, rel=1e-3)
    assert 0 < seconds <= json.loads((out / "all_results.json").read_text())["train_runtime"]
    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert (saved.esam_rho, saved.learning_rate, saved.per_device_train_batch_size) == (0.0, 0.05, 64)
    card = (out / "README.md").read_text()
    assert "| 0.0 | 1.0 | 1.0 |" in card and "plain training" in card


@pytest.mark.parametrize("argv, match", [
    (["--recipe", "no-such-recipe"], "invalid choice"),
    (["--optimizer", "adam"], "invalid choice"),
    (["--esam_gamma", "0"], r"esam_gamma must be in \(0, 1\]"),
])
def test_cli_rejects_bad_arguments_before_training(tmp_path, argv, match, capsys):
    with pytest.raises((SystemExit, ValueError)) as err:
        cli_main(["train", "--output_dir", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()  # nothing written
    text = str(err.value) + capsys.readouterr().err
    assert re.search(match, text), text


def test_unknown_model_name_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match="cifar_resnet18"):
        make_trainer(ModelArguments("cifar_resnet19"), DataArguments("cifar10-subset", max_train_samples=16, max_eval_samples=16),
                     ESAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))


TINY = ["--model_name", "cifar_resnet18", "--model_kwargs", '{"channels": [8, 16, 32, 64]}', "--use_cpu",
        "--disable_tqdm", "true", "--report_to", "none", "--per_device_train_batch_size", "16"]


def _record(out):
    import json

    return json.loads((out / "esam_run.json").read_text())


def test_two_builds_with_one_seed_give_identical_weights_whatever_ran_before():
    from esam_hf.run import build_model_and_data

    model_args = ModelArguments("cifar_resnet18", model_kwargs='{"channels": [8, 16, 32, 64]}')
    data_args = DataArguments("cifar10-subset", max_train_samples=16, max_eval_samples=16)
    first = build_model_and_data(model_args, data_args, seed=3)[1].state_dict()
    torch.rand(1000), np.random.rand(7)  # whatever else consumed random numbers in between
    second = build_model_and_data(model_args, data_args, seed=3)[1].state_dict()
    other = build_model_and_data(model_args, data_args, seed=4)[1].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_a_diverged_run_exits_1_and_is_recorded_as_diverged(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--output_dir", str(out), *TINY, "--dataset", "cifar10-subset", "--max_train_samples", "64",
                  "--max_eval_samples", "32", "--max_steps", "12", "--learning_rate", "0.05", "--optim", "sgd",
                  "--weight_decay", "1e6", "--save_strategy", "no"])
    assert exit_.value.code == 1 and "training diverged" in capsys.readouterr().err
    assert _record(out)["status"] == "diverged"
    results = json.loads((out / "all_results.json").read_text())
    assert "diverged" in results and "eval_accuracy" not in results
    assert not (out / "README.md").exists()  # no card presents it as a trained model


def test_a_rerun_into_a_used_output_dir_is_refused_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--output_dir", str(out), *TINY, "--dataset", "cifar10-subset", "--max_train_samples", "32",
            "--max_eval_samples", "16", "--save_strategy", "steps", "--save_steps", "1", "--learning_rate", "0.01"]
    cli_main([*argv, "--max_steps", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--max_steps", "2"])
    assert exit_.value.code == 2 and "already holds a finished esam run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*argv, "--max_steps", "2", "--resume_from_checkpoint", "last"])
    assert "was trained with other settings (training.max_steps: 1 -> 2" in capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit):  # a finished run is finished: nothing resumes, nothing is rewritten
        cli_main([*argv, "--max_steps", "1", "--resume_from_checkpoint", "last"])
    assert "has finished; there is nothing to resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    cli_main([*argv, "--max_steps", "2", "--overwrite_output_dir"])
    assert _record(out)["settings"]["training"]["max_steps"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_split_flags_and_image_checks_reach_the_data(tmp_path, monkeypatch):
    import io

    from PIL import Image

    def png(color):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), color).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = [png((i * 20, 0, 0)) for i in range(8)]
    rows[5] = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict({"image": rows, "label": [0, 1] * 4}, features=features)
    data.to_parquet(str(tmp_path / "only.parquet"))
    argv = ["train", "--output_dir", str(tmp_path / "run"), *TINY, "--dataset", str(tmp_path / "only.parquet"),
            "--max_steps", "1", "--save_strategy", "no"]
    monkeypatch.setenv("ESAM_HF_DEBUG", "1")  # the data error itself (its one-line report: test_cli_usability.py)
    # One file is one split, "train": without an eval split named, evaluation has nothing to read.
    with pytest.raises(Exception, match="split 'validation' not found.*available splits: \\['train'\\]"):
        cli_main([*argv, "--eval_split", "validation"])
    with pytest.raises(Exception, match=r"(?s)split 'train'.*row 5: UnidentifiedImageError"):
        cli_main([*argv, "--eval_split", "none", "--check_images"])
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_train_only_dataset_holds_out_a_stratified_validation_share(tmp_path):
    import io
    import json

    from PIL import Image

    from esam_hf.data.images import ROW_COLUMN
    from esam_hf.data.specs import load_splits, resolve_dataset

    def png(i):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 6 % 256, 0, 0)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    labels = [0] * 20 + [1] * 20  # sorted by class, as many files are
    datasets.Dataset.from_dict({"image": [png(i) for i in range(40)], "label": labels},
                               features=features).to_parquet(str(tmp_path / "only.parquet"))
    spec = resolve_dataset(str(tmp_path / "only.parquet"), train_val_split=0.15)
    train, held, _ = load_splits(spec, seed=3)
    train_rows, held_rows = set(train[ROW_COLUMN]), set(held[ROW_COLUMN])
    assert len(held_rows) == 6 and not train_rows & held_rows and train_rows | held_rows == set(range(40))
    assert sorted(held["label"]) == [0, 0, 0, 1, 1, 1]  # stratified
    assert set(load_splits(spec, seed=3)[1][ROW_COLUMN]) == held_rows  # seeded
    out = tmp_path / "run"
    cli_main(["train", "--output_dir", str(out), *TINY, "--dataset", str(tmp_path / "only.parquet"), "--max_steps", "1",
              "--save_strategy", "no"])
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_accuracy" in results and json.loads((out / "esam_run.json").read_text())["eval_samples"] == 6
    # The transformers examples' result files, split as they split them.
    train_results = json.loads((out / "train_results.json").read_text())
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert train_results["train_loss"] == results["train_loss"] and "eval_accuracy" not in train_results
    assert eval_results["eval_accuracy"] == results["eval_accuracy"] and "train_loss" not in eval_results
    card = (out / "README.md").read_text()
    assert "validation (15% of train, held out)" in card and "No evaluation was run" not in card


def test_training_on_the_evaluation_split_is_announced_and_carded(tmp_path, capsys):
    out = tmp_path / "run"
    cli_main(["train", "--output_dir", str(out), *TINY, "--dataset", "cifar10-subset", "--train_split", "test",
              "--eval_split", "test", "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "1",
              "--save_strategy", "no"])
    assert "evaluating on the training split 'test'" in capsys.readouterr().err
    assert "also the training split: the scores measure fit, not generalisation" in (out / "README.md").read_text()


def test_the_trainer_built_paper_sgd_steps_as_the_ready_one(tmp_path):
    """Under FSDP the Trainer builds the optimizer (from PaperSGD and its parameter groups, which exempt biases and
    norms from weight decay); it must step as `paper_sgd` does: weight decay on every parameter."""
    from transformers import Trainer

    from esam_hf.run import PaperSGD, paper_sgd, paper_sgd_options

    args = ESAMTrainingArguments(output_dir=str(tmp_path), learning_rate=0.1, weight_decay=0.05, optim="sgd",
                                 optim_args="momentum=0.8,nesterov=true", use_cpu=True, report_to="none")
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ready = paper_sgd(models[0], args)
    trainer = Trainer(model=models[1], args=args, optimizer_cls_and_kwargs=(PaperSGD, paper_sgd_options(args)))
    built = trainer.create_optimizer()
    assert isinstance(built, PaperSGD) and len(built.param_groups) == 2  # the Trainer's decay / no-decay groups
    for _ in range(3):
        for model, optimizer in zip(models, (ready, built)):
            optimizer.zero_grad()
            model(torch.ones(2, 4)).pow(2).sum().backward()
            optimizer.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
