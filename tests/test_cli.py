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


# --------------------------------------------------------------------------- #
# Bad options are usage errors naming the flag, with any recipe, before data, model or output folder
# --------------------------------------------------------------------------- #
@pytest.fixture
def no_data(monkeypatch):
    """Fail loudly if `esam-hf train` gets as far as building data or a model."""
    import esam_hf.run

    def refuse(*args, **kwargs):
        raise AssertionError("data and model were built before the options were checked")

    monkeypatch.setattr(esam_hf.run, "build_model_and_data", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--save_strategy", "steps", "--save_steps", "0"], "--save_steps must be > 0 with --save_strategy steps"),
    (["--save_strategy", "steps", "--save_steps", "-1"], "--save_steps must be > 0 with --save_strategy steps"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0, got nan"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be a finite number > 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an integer >= 1, got 0"),
    (["--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps must be an integer >= 1, got -1"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number >= 0 (0 turns clipping off), got nan"),
    (["--optim_args", "momentum=abc"], "--optim_args momentum=abc: momentum must be a number >= 0, got 'abc'"),
    (["--optim_args", "momentum"], "--optim_args takes comma-separated key=value pairs"),
    (["--optim_args", "momentun=0.5"], "--optim_args momentun=0.5: --optim sgd takes no 'momentun'; its keys are "
                                       "momentum=a number >= 0; dampening="),
    (["--optim_args", "nesterov=maybe"], "--optim_args nesterov=maybe: nesterov must be true or false, got 'maybe'"),
    (["--optim_args", "momentum=0,nesterov=true"],  # torch's own check
     "--optim_args momentum=0,nesterov=true: Nesterov momentum requires a momentum"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**32 - 1"),
    (["--seed", str(2**32)], "--seed must be an integer from 0 to 2**32 - 1"),
    (["--data_seed", "-3"], "--data_seed must be an integer from 0 to 2**32 - 1"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 cannot both be set"),
    (["--report_to", "nosuchtracker"], "--report_to ['nosuchtracker']: nosuchtracker is not supported"),
    (["--eval_split", "none", "--do_eval"], "--eval_split none turns evaluation off, but --do_eval asks for it"),
    (["--eval_split", "none", "--eval_strategy", "steps"],
     "--eval_split none turns evaluation off, but --eval_strategy steps asks for it"),
])
def test_bad_training_options_are_usage_errors_before_anything_is_built(tmp_path, capsys, no_data, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--recipe", "demo", "--output_dir", str(out), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"esam-hf train: error: {message}" in err
    assert not out.exists()


def test_the_learning_rate_message_is_about_the_learning_rate(capsys, no_data, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "demo", "--output_dir", str(tmp_path / "out"), "--learning_rate", "-1"])
    assert "clipping" not in capsys.readouterr().err


def test_an_empty_output_dir_is_refused_naming_the_flag(tmp_path, capsys, no_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--recipe", "demo", "--output_dir", ""])
    assert exit_.value.code == 2 and "--output_dir must name a folder, got ''" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_training_checks_wait_for_a_command_that_trains(tmp_path):
    from esam_hf.run import parse

    # Evaluating a saved model trains nothing: a learning rate it never uses is not its business.
    *_, training = parse(["--recipe", "demo", "--output_dir", str(tmp_path), "--do_eval", "--learning_rate", "nan"])
    assert training.do_eval and not training.do_train
    # Valid --optim_args reach the paper's SGD as transformers reads them.
    from esam_hf.run import paper_sgd_options

    *_, training = parse(["--recipe", "demo", "--output_dir", str(tmp_path), "--optim_args", "momentum=0.8, nesterov=True"])
    assert paper_sgd_options(training) == {"lr": training.learning_rate, "momentum": 0.8, "nesterov": True,
                                           "weight_decay": training.weight_decay}


def test_eval_split_none_turns_a_recipes_evaluation_off(tmp_path, capsys):
    from esam_hf.run import parse

    *_, data, training = parse(["--recipe", "demo", "--output_dir", str(tmp_path / "x"), "--eval_split", "none"])
    assert (training.eval_strategy, training.do_eval, training.do_train) == ("no", False, True)
    *_, training = parse(["--recipe", "demo", "--output_dir", str(tmp_path / "x")])
    assert (training.eval_strategy, training.do_eval) == ("epoch", True)  # the recipe's, without the flag
    out = tmp_path / "run"
    metrics = main(["train", "--recipe", "demo", "--output_dir", str(out), "--eval_split", "none",
                    "--model_kwargs", '{"channels": [8, 16, 32, 64]}', "--max_train_samples", "32",
                    "--per_device_train_batch_size", "16", "--max_steps", "2", "--save_strategy", "no",
                    "--disable_tqdm", "true"])
    assert metrics == 0  # the CLI's exit status
    results = json.loads((out / "all_results.json").read_text())
    assert "train_loss" in results and not any(k.startswith("eval_") for k in results)
    assert json.loads((out / "esam_run.json").read_text())["status"] == "finished"


def test_argument_files_mean_what_the_same_flags_mean(tmp_path, capsys):
    from esam_hf.run import parse

    args = tmp_path / "args.yaml"
    args.write_text(f"output_dir: {tmp_path / 'y'}\nrecipe: demo\neval_split: null\nreport_to: [none]\n"
                    "max_train_samples: ~\n")
    *_, data, training = parse([str(args)])
    *_, flag_data, flag_training = parse(["--output_dir", str(tmp_path / "y"), "--recipe", "demo",
                                          "--report_to", "none"])
    assert data.eval_split is None and data.max_train_samples is None  # null: not set, not the string "None"
    assert training.report_to == flag_training.report_to == []
    assert (training.eval_strategy, training.do_eval) == (flag_training.eval_strategy, flag_training.do_eval)
    args.write_text(f"output_dir: {tmp_path / 'y'}\nreport_to: [tensorboard, wandb]\n")
    *_, training = parse([str(args)])
    assert training.report_to == ["tensorboard", "wandb"]  # a list, as transformers' own YAML parsing gives
    json_args = tmp_path / "args.json"
    json_args.write_text(json.dumps({"output_dir": str(tmp_path / "z"), "eval_split": None, "report_to": ["none"]}))
    *_, data, training = parse([str(json_args)])
    assert data.eval_split is None and training.report_to == []


def test_a_yaml_argument_file_with_a_tab_is_a_usage_error_naming_file_and_line(tmp_path, capsys):
    args = tmp_path / "args.yaml"
    args.write_text(f"output_dir: {tmp_path / 'out'}\nrecipe: demo\n\tmax_steps: 2\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(args)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"esam-hf train: error: cannot read the argument file {args} (line 3, column 1)" in err
    assert "tabs" in err and not (tmp_path / "out").exists()
    args.write_text(f"output_dir: {tmp_path / 'out'}\nreport_to: [nosuchtracker]\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(args)])
    assert exit_.value.code == 2 and "--report_to ['nosuchtracker']" in capsys.readouterr().err
