"""The `esam-hf` commands share one convention: full `--help` (ESAM options first), HfArgumentParser
flags, usage errors (status 2) that name the option before any work."""

import json

import pytest

from esam_hf.cli import main


@pytest.mark.parametrize("command", ["train", "reproduce", "bench", "landscape", "recipes"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith(f"usage: esam-hf {command}")
    if command in ("train", "reproduce"):  # the whole parser, ESAM flags before TrainingArguments' ~150
        assert "--recipe" in text and "--num_train_epochs" in text
        assert text.index("--esam_rho") < text.index("--recipe") < text.index("--num_train_epochs")


def test_version_and_unknown_command(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("esam-hf ")
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--methods", ","], "--methods: name at least one of"),
    (["--methods", "sgd,adam"], "--methods: unknown ['adam']"),
    (["--settings", "5"], "--settings: '5' is not a setting here"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--repeat", "2"], "did you mean --repeats"),
])
def test_bench_refuses_bad_options(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--output_dir", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_times_interleaved_repeats_and_writes_its_tables(tmp_path):
    main(["bench", "--methods", "sgd,esam", "--steps", "2", "--warmup", "1", "--repeats", "2",
          "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "throughput.json").read_text())
    (result,) = saved["results"]
    assert result["timed_steps"] == 2 and set(result["all_images_per_s"]) == {"sgd", "esam"}
    assert all(len(r) == 2 and min(r) > 0 for r in result["all_images_per_s"].values())
    ratio = result["ratios"]["esam/sgd"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "esam/sgd" in result["cpu_time_ratios"]
    assert "| esam" not in (tmp_path / "throughput.md").read_text().split("\n")[0]


def test_example_scripts_default_to_a_recipe_and_say_so(capsys):
    from esam_hf.run import parse

    recipe, _, model, data, training = parse(["--output_dir", "x"], prog="train_cifar.py",
                                             default_recipe="cifar10-resnet18")
    assert "no --recipe given: using the 'cifar10-resnet18' recipe" in capsys.readouterr().err
    assert (recipe.recipe, training.learning_rate, training.optim, training.num_train_epochs) == (
        "cifar10-resnet18", 0.05, "sgd", 200)
    assert (training.per_device_train_batch_size, training.esam_rho, training.lr_scheduler_type) == (128, 0.05, "cosine")
    recipe, *_, training = parse(["--output_dir", "x", "--dataset", "cifar100", "--model_name", "cifar_wrn28_10",
                                  "--learning_rate", "0.1"], prog="train_cifar.py", default_recipe="cifar10-resnet18")
    assert recipe.recipe == "cifar100-wrn28-10" and training.esam_rho == 0.1 and training.learning_rate == 0.1
    with pytest.raises(SystemExit):
        parse(["--output_dir", "x", "--learning_ratee", "1"], prog="train_cifar.py", default_recipe="cifar10-resnet18")
    assert "train_cifar.py: error:" in capsys.readouterr().err


def test_one_json_or_yaml_argument_file_works_as_flags(tmp_path):
    import json

    from esam_hf.run import parse

    (tmp_path / "args.json").write_text(json.dumps({"output_dir": str(tmp_path / "x"), "recipe": "demo",
                                                    "learning_rate": 0.02, "esam_selection": "sharpness",
                                                    "model_kwargs": {"channels": [8, 16, 32, 64]}}))
    recipe, _, model, _, training = parse([str(tmp_path / "args.json")])
    assert (recipe.recipe, training.learning_rate, training.esam_selection) == ("demo", 0.02, "sharpness")
    assert training.num_train_epochs == 10 and training.per_device_train_batch_size == 64  # the recipe's defaults
    assert json.loads(model.model_kwargs) == {"channels": [8, 16, 32, 64]}
    (tmp_path / "args.yaml").write_text(f"output_dir: {tmp_path / 'y'}\nnum_train_epochs: 3\n")
    *_, training = parse([str(tmp_path / "args.yaml")])
    assert training.num_train_epochs == 3


def test_help_says_what_trainer_options_do_here(capsys):
    from esam_hf.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'sgd' here is the paper's SGD (momentum 0.9" in text
    assert "'last' continues the newest complete checkpoint in --output_dir" in text
    assert "default: train and evaluate when neither --do_train nor --do_eval is given" in text
