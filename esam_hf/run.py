"""Train an image classifier end to end: dataset + timm backbone + ESAMTrainer -> saved, carded model.

`esam-hf train` (`main`) and the examples are thin argument parsers around `train_image_classifier`.
Every run records what it trained in `esam_run.json` in its output folder: the settings that
determine the result, a checksum of the initial weights, the method, its status (running,
finished or diverged) and every file it wrote. A rerun into that folder is refused unless it resumes
the same settings or replaces the run. The folder itself (record, checkpoints, claim, lock) is
`esam_hf.run_folder`'s; the per-epoch timeline is `esam_hf.timeline`'s and `--optim sgd`, the authors' SGD,
`esam_hf.paper_sgd`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .arguments import argument_file_flags, explicit_options, make_parser, parse_args, usage_error
from .paper_sgd import PaperSGD, paper_sgd, paper_sgd_options
from .recipes import RECIPES, RecipeArguments, default_recipe_for, method_of, optimizer_conflicts, recipe_defaults
# The output folder (record, manifest, checkpoints, claim and lock) lives in run_folder.
from .run_folder import (FolderInTheWay, OutputDirClaim, RunFolder, RunFolderCallback, checkpoint_ends_run, checkpoints,
                         claim_output_dir, read_record, resolve_checkpoint, write_json)
from .timeline import TIMELINE, TimelineCallback, training_throughput

PROG = "esam-hf train"
# TrainingArguments that change what a run trains (compared before a run is reused or resumed);
# logging, saving, evaluation and data-loading options do not.
_RESULT_FIELDS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "warmup_ratio", "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "optim_args",
    "label_smoothing_factor", "bf16", "fp16", "tf32", "torch_compile",
)


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name: str = field(default="cifar_resnet18", metadata={"help": "Any timm model name, or cifar_resnet18, cifar_wrn28_10, cifar_pyramidnet110."})
    pretrained: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights (needs the Hub)."})
    model_kwargs: str | None = field(default=None, metadata={"help": 'JSON object of extra timm.create_model kwargs, e.g. \'{"drop_rate": 0.1}\'.'})
    channels_last: bool = field(default=False, metadata={"help": "Use the channels_last memory format (faster convolutions on GPUs)."})

    def __post_init__(self):
        self.timm_kwargs()  # a bad --model_kwargs fails here, before any work

    def timm_kwargs(self) -> dict[str, Any]:
        if not self.model_kwargs:
            return {}
        try:
            kwargs = json.loads(self.model_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_kwargs must be a JSON object such as '{{\"drop_rate\": 0.1}}': {e}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model_kwargs must be a JSON object such as '{{\"drop_rate\": 0.1}}', got {self.model_kwargs!r}")
        return kwargs


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset: str = field(default="cifar10", metadata={"help": "cifar10, cifar100, imagenet, cifar10-subset, a Hub id or a local directory."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (built in for the known datasets)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (built in for the known datasets)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a class-balanced subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a class-balanced subset of this size."})
    cutout: bool = field(default=True, metadata={"help": "CIFAR: Cutout 16px with p=0.5 (the paper's augmentation)."})
    random_crop: bool = field(default=True, metadata={"help": "CIFAR: random crop 32 with 4px padding."})
    horizontal_flip: bool = field(default=True, metadata={"help": "CIFAR: random horizontal flip."})
    train_split: str | None = field(default=None, metadata={"help": "Training split (default: train)."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Evaluation split (default: test, else validation); 'none' turns evaluation off."})
    train_val_split: float = field(default=0.15, metadata={
        "help": "When the dataset has no evaluation split: the share of the training split held out (stratified, "
                "seeded by --seed) to evaluate on, as in the transformers examples; 0 = no evaluation."})
    check_images: bool = field(default=False, metadata={
        "help": "Decode every training image before the first step, so a bad one is an error naming its split "
                "and row, not a crash mid-epoch (CIFAR-size data is always decoded up front)."})
    check_eval_images: bool = field(default=True, metadata={
        "help": "Decode every evaluation image before training, so a bad one cannot fail the first evaluation."})


@dataclass
class RunArguments:
    _argument_group_name = "run"

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the run in output_dir: delete the files it wrote (as its esam_run.json lists them), once the "
                "new run's data and model are built; refused, deleting nothing, if the folder holds anything else. "
                "Otherwise a run into a non-empty output_dir is refused unless it resumes it with "
                "--resume_from_checkpoint last."})


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (every device), as the Trainer does before it trains."""
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def build_model_and_data(model_args: ModelArguments, data_args: DataArguments, seed: int = 0, check_workers: int = 0):
    """Resolve the dataset, build the model for its classes (weights from `seed`, whatever ran before),
    and the data pipeline that matches the model's input config (so training transforms and the saved
    image processor agree). `check_workers` processes decode the images that `data_args` asks to check."""
    from .data import build_datasets, cifar_data_config, load_splits, resolve_dataset
    from .models import create_model

    spec = resolve_dataset(data_args.dataset, data_args.image_column, data_args.label_column,
                           train_split=data_args.train_split, eval_split=data_args.eval_split,
                           train_val_split=data_args.train_val_split)
    # The model needs the class names and the pipeline needs the model's data config; this first,
    # validating read is answered from the datasets cache when build_datasets loads the splits again.
    class_names = load_splits(spec, max_train_samples=1, max_eval_samples=1, seed=seed)[2]
    kwargs = model_args.timm_kwargs()
    if spec.kind == "cifar":  # normalisation statistics of this CIFAR, stored in the saved config
        stats = cifar_data_config(len(class_names))
        kwargs.setdefault("pretrained_cfg_overlay", {"mean": tuple(stats["mean"]), "std": tuple(stats["std"])})
    set_seed(seed)
    model = create_model(model_args.model_name, class_names, pretrained=model_args.pretrained, **kwargs)
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = build_datasets(
        spec, dict(model.config.pretrained_cfg), max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples, seed=seed, crop=data_args.random_crop,
        flip=data_args.horizontal_flip, cutout=data_args.cutout, check_train_images=data_args.check_images,
        check_eval_images=data_args.check_eval_images, check_workers=check_workers,
    )
    return spec, model, data


def make_trainer(model_args: ModelArguments, data_args: DataArguments, training_args, trainer_cls=None, **trainer_kwargs):
    """An ESAMTrainer (or `trainer_cls`) wired to the model, data and top-1/top-5 metrics."""
    _, model, data = build_model_and_data(model_args, data_args, training_args.seed,
                                          check_workers=training_args.dataloader_num_workers)
    return image_trainer(model, data, training_args, trainer_cls, **trainer_kwargs)


def image_trainer(model, data, training_args, trainer_cls=None, **trainer_kwargs):
    """The trainer of `make_trainer` for a model and data already built.
    `optim="sgd"` means the paper's SGD (`paper_sgd`), not the Trainer's momentum-free default."""
    from .hub import image_processor
    from .metrics import compute_metrics_fn
    from .trainer import ESAMTrainer

    training_args.remove_unused_columns = False  # datasets already yield model inputs; nothing to prune
    top_k = (1, 5) if len(data.class_names) >= 10 else (1,)
    if training_args.optim == "sgd" and _fsdp(training_args):
        trainer_kwargs.setdefault("optimizer_cls_and_kwargs", (PaperSGD, paper_sgd_options(training_args)))
    elif training_args.optim == "sgd":
        trainer_kwargs.setdefault("optimizers", (paper_sgd(model, training_args), None))
    # The Trainer saves its processing_class into every checkpoint: each one then loads as a model folder.
    trainer_kwargs.setdefault("processing_class", image_processor(model))
    return (trainer_cls or ESAMTrainer)(
        model=model, args=training_args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
        data_collator=data.collator, compute_metrics=compute_metrics_fn(top_k), **trainer_kwargs,
    )


def _fsdp(training_args) -> bool:
    """Whether the Trainer will shard with FSDP: asked in TrainingArguments or by `accelerate launch`'s config."""
    return bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


# --------------------------------------------------------------------------- #
# What a run trained: its record
# --------------------------------------------------------------------------- #
def run_settings(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict[str, Any]:
    """The settings that determine a run's result, JSON-ready."""
    from .trainer import esam_config

    training = {name: getattr(training_args, name) for name in _RESULT_FIELDS if hasattr(training_args, name)}
    training.update(esam_config(training_args))
    settings = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                "training": training, "world_size": training_args.world_size}
    return json.loads(json.dumps(settings, default=str))


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 of the model's state (parameters and buffers), to show runs start from the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def train_image_classifier(model_args: ModelArguments, data_args: DataArguments, training_args,
                           recipe: str = "custom", resume_from_checkpoint: str | bool | None = None,
                           callbacks: list | None = None, train: bool = True, evaluate: bool = True,
                           claim: OutputDirClaim | None = None) -> dict[str, Any]:
    """Train (`train`), save the model (with its image processor config and card), evaluate
    (`evaluate`); record the run in `esam_run.json`. Returns the final metrics. (`esam-hf train`
    passes `--do_train` / `--do_eval` here, both on unless one of them is given.)

    A run that diverged (non-finite gradients or weights) records "diverged", writes its results
    with the reason and raises `TrainingDiverged`: it never reports a score as if it had trained.
    A run stopped by any other error records "failed" (or "interrupted") with the error and its step. With
    `claim` (from `claim_output_dir`), the old run it replaces is deleted only once the new data and model
    are built, so a mistake in the new command costs nothing. Every file the run writes goes into the
    record's manifest (see `esam_hf.run_folder`). Resumed from a checkpoint of its last step, the run
    finishes without training (`finish_from_last_checkpoint`)."""
    from .trainer import TrainingDiverged, esam_config

    output_dir = training_args.output_dir
    settings = run_settings(model_args, data_args, training_args)
    spec, model, data = build_model_and_data(model_args, data_args, training_args.seed,
                                             check_workers=training_args.dataloader_num_workers)
    trainer = image_trainer(model, data, training_args, callbacks=callbacks)
    if claim is not None:
        claim.clear_old_run()
    folder = RunFolder.open(output_dir, writer=trainer.is_world_process_zero())
    try:
        record = folder.record
        for stale in ("metrics", "error", "global_step"):
            record.pop(stale, None)
        record.update(settings=settings, method=method_of(esam_config(training_args)), recipe=recipe, status="running",
                      train_samples=len(data.train_dataset) if data.train_dataset is not None else None,
                      eval_samples=len(data.eval_dataset) if data.eval_dataset is not None else None)
        record.setdefault("initial_weights_sha256", weights_checksum(trainer.model))
        if resume_from_checkpoint:
            record["resumed_from"] = resume_source(resume_from_checkpoint, output_dir)
        folder.save()
        tracker = RunFolderCallback(folder, trainer.callback_handler.callbacks)
        trainer.add_callback(tracker)
        checkpoint = resolve_checkpoint(output_dir, resume_from_checkpoint) if train else None

        metrics: dict[str, Any] = {}
        if train:
            try:
                if checkpoint and checkpoint_ends_run(checkpoint):
                    metrics.update(finish_from_last_checkpoint(trainer, checkpoint))
                else:
                    metrics.update(trainer.train(resume_from_checkpoint=checkpoint).metrics)
            except TrainingDiverged as e:
                _finish(trainer, folder, tracker, {**metrics, "diverged": str(e)}, status="diverged")
                raise
            except BaseException as e:
                tracker.sync()
                record.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                              error=f"{type(e).__name__}: {e}", global_step=trainer.state.global_step)
                folder.save()
                raise
            # Save before evaluating: an evaluation error must not cost the finished training.
            with folder.writing_to("."):
                trainer.save_model()
                trainer.save_state()
        if evaluate and trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        broken = [k for k in ("train_loss", "eval_loss") if k in metrics and not math.isfinite(metrics[k])]
        if broken:  # finite weights whose outputs overflow: no score of this model means anything
            reason = (f"{' and '.join(broken)} not finite: the weights grew until the model's outputs overflow "
                      "(lower the learning rate or weight decay)")
            kept = {k: v for k, v in metrics.items() if not k.endswith("accuracy")}  # scores of a broken model: dropped
            _finish(trainer, folder, tracker, {**kept, "diverged": reason}, status="diverged")
            raise TrainingDiverged(f"training diverged: {reason}")
        _finish(trainer, folder, tracker, metrics, status="finished")
        if train:
            kwargs = card_kwargs(spec, data, model, model_args, data_args, recipe, output_dir, record)
            with folder.writing_to("."):
                trainer.create_model_card(**kwargs)
                if training_args.push_to_hub:
                    trainer.push_to_hub(**kwargs)
    finally:
        folder.close()
    return metrics


def finish_from_last_checkpoint(trainer, checkpoint: str) -> dict[str, Any]:
    """What resuming from `checkpoint`, saved at the run's last step, leaves to do: nothing to train.
    (`Trainer.train` would train one step past `max_steps` when that step ends mid-epoch.) The model gets
    the checkpoint's weights and the trainer its state, the callbacks see a training call that takes no
    step, and the train metrics are the whole run's: its mean loss over every step, from the log history
    (a checkpoint's history covers every step up to it; `RunFolderCallback` logs at each save)."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    trainer.state.is_local_process_zero = trainer.is_local_process_zero()
    trainer.state.is_world_process_zero = trainer.is_world_process_zero()
    handler = trainer.callback_handler
    handler.train_dataloader = trainer.get_train_dataloader()
    trainer.control = handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
        trainer._load_best_model()
    metrics = {"total_flos": trainer.state.total_flos}
    loss = whole_run_loss(trainer.state.log_history, trainer.state.global_step)
    if loss is not None:
        metrics["train_loss"] = loss
    trainer.log(metrics)  # the entry an uninterrupted run logs at its end (its callbacks may edit `metrics`, as there)
    trainer.control = handler.on_train_end(trainer.args, trainer.state, trainer.control)
    return metrics


def whole_run_loss(log_history: list[dict], global_step: int) -> float | None:
    """The mean training loss over steps 1..`global_step` from the logged losses (each the mean since the
    previous log), or None when the logs do not cover every step."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] > last:
            total, last = total + entry["loss"] * (entry["step"] - last), entry["step"]
    return total / global_step if global_step and last == global_step else None


def restore_card(model_args: ModelArguments, data_args: DataArguments, training_args, recipe: str = "custom") -> str:
    """Write a finished run's model card again from what the run saved (the model, `trainer_state.json`
    with its logged metrics, the record), e.g. after the README.md was lost. Returns the card's path."""
    from transformers import AutoModelForImageClassification, TrainerState

    from . import models  # noqa: F401  (the CIFAR backbones, for from_pretrained)

    out = training_args.output_dir
    spec, _, data = build_model_and_data(model_args, data_args, training_args.seed)
    model = AutoModelForImageClassification.from_pretrained(out)
    trainer = image_trainer(model, data, training_args)
    trainer.state = TrainerState.load_from_json(os.path.join(out, "trainer_state.json"))
    folder = RunFolder.open(out, writer=trainer.is_world_process_zero())
    record = folder.record
    # The final evaluation ran after trainer_state.json was saved: the record holds it.
    final = {k: v for k, v in (record.get("metrics") or {}).items() if k.startswith("eval_")}
    if final:
        trainer.state.log_history.append(final)
    try:
        with folder.writing_to("."):
            trainer.create_model_card(**card_kwargs(spec, data, model, model_args, data_args, recipe, out, record))
    finally:
        folder.close()
    return os.path.join(out, "README.md")


def resume_source(checkpoint: str | bool, output_dir: str) -> dict[str, Any]:
    """Where a resumed run continues from: the checkpoint, its step, and the method of the run that wrote it."""
    path = checkpoint if isinstance(checkpoint, str) else (checkpoints(output_dir) or [None])[0]
    source: dict[str, Any] = {"checkpoint": os.path.abspath(path) if path else None}
    if path:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(os.path.join(path, "trainer_state.json")) as f:
                source["step"] = json.load(f)["global_step"]
        with contextlib.suppress(ValueError, OSError):
            parent = read_record(os.path.dirname(os.path.abspath(path)))
            if parent:
                source["method"] = parent.get("method")
    return source


def card_kwargs(spec, data, model, model_args: ModelArguments, data_args: DataArguments, recipe: str,
                output_dir: str, record: dict | None = None) -> dict[str, Any]:
    """What the model card says about the run: the dataset's Hub id (or path) and the name it was asked
    by, the evaluated split and how much of it, the recipe, the pretrained weights it started from, and
    the checkpoint it was resumed from (from the run's record)."""
    finetuned_from = None
    if model_args.pretrained:
        cfg = getattr(getattr(model, "timm_model", model), "pretrained_cfg", None) or {}
        finetuned_from = cfg.get("hf_hub_id") or model_args.model_name
    return {"dataset": spec.path, "dataset_name": data_args.dataset, "eval_split": spec.eval_name,
            "eval_samples": len(data.eval_dataset) if data.eval_dataset is not None else None,
            "eval_split_size": data.eval_split_size, "recipe": recipe, "finetuned_from": finetuned_from,
            "model_name": os.path.basename(os.path.normpath(output_dir)),
            **({"resumed_from": record["resumed_from"]} if (record or {}).get("resumed_from") else {})}


def _finish(trainer, folder: RunFolder, tracker: RunFolderCallback, metrics: dict, status: str) -> None:
    if trainer.is_world_process_zero():
        tracker.finish()
        # The transformers examples' files: train_results.json and eval_results.json beside all_results.json.
        # Not `Trainer.save_metrics`, which writes in place: a kill mid-write would leave a truncated file.
        out = trainer.args.output_dir
        for split, part in (("train", {k: v for k, v in metrics.items() if not k.startswith("eval_")}),
                            ("eval", {k: v for k, v in metrics.items() if k.startswith("eval_") or k == "epoch"})):
            if any(k != "epoch" for k in part):
                write_json(os.path.join(out, f"{split}_results.json"), part)
        write_json(os.path.join(out, "all_results.json"), metrics)
        folder.record.update(status=status, metrics=metrics)
        folder.save()


# --------------------------------------------------------------------------- #
# `esam-hf train`
# --------------------------------------------------------------------------- #
TRAIN_DEFAULTS = {"remove_unused_columns": False, "report_to": "none"}


def parse(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str = PROG,
          default_recipe: str | None = None):
    """`(recipe_args, run_args, model_args, data_args, training_args)` from the command line: a recipe's
    defaults (and `defaults`) under the flags given; an `--optimizer` that contradicts a flag is refused.
    Without `--recipe`, `default_recipe` (if given; see `default_recipe_for`) supplies the defaults, and
    the command says so: an example script must not train at the Trainer's learning rate by accident."""
    from .data.specs import NO_EVAL
    from .trainer import ESAMTrainingArguments

    argv = sys.argv[1:] if argv is None else list(argv)
    types = [RecipeArguments, RunArguments, ModelArguments, DataArguments, ESAMTrainingArguments]
    pre = make_parser(types, prog=prog, add_help=False)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # one argument file
        argv = argument_file_flags(pre, argv[0])
    recipe = pre.parse_known_args(argv)[0]  # the recipe decides the other options' defaults
    no_eval = recipe.eval_split is not None and recipe.eval_split.lower() == NO_EVAL
    if no_eval:  # no evaluation split: the recipes' per-epoch evaluation is off too
        given = explicit_options(pre, argv)
        strategy = getattr(recipe.eval_strategy, "value", recipe.eval_strategy)
        asked = ([f"--eval_strategy {strategy}"] if "eval_strategy" in given and strategy != "no" else []) + (
            ["--do_eval"] if "do_eval" in given and recipe.do_eval else [])
        if asked:
            pre.error(f"--eval_split {recipe.eval_split} turns evaluation off, but {' and '.join(asked)} asks for it: "
                      "drop one of them.")
    if recipe.recipe is None and default_recipe is not None:
        recipe.recipe = default_recipe_for(argv, default_recipe)
        argv = ["--recipe", recipe.recipe, *argv]
        print(f"{prog}: no --recipe given: using the {recipe.recipe!r} recipe's settings for every option you did "
              "not set (`esam-hf recipes` lists them).", file=sys.stderr)
    defaults = {**TRAIN_DEFAULTS, "dataloader_pin_memory": torch.cuda.is_available(), **(defaults or {}),
                **recipe_defaults(recipe.recipe, recipe.optimizer), **({"eval_strategy": "no"} if no_eval else {})}
    recipes = "; ".join(f"{name} ({r.model} on {r.dataset}, {r.epochs} epochs)" for name, r in RECIPES.items())
    parser = make_parser(
        types, prog=prog, defaults=defaults, first_group=("ESAM (sharpness-aware minimization)", "esam_"),
        description="Train an image classifier with ESAM, SAM or SGD. Recipes: " + recipes + ".",
        epilog="Every transformers TrainingArguments option is accepted. --resume_from_checkpoint last continues "
               "the newest checkpoint in --output_dir.")
    parsed = parse_args(parser, argv)
    recipe_args, training_args = parsed[0], parsed[-1]
    explicit = explicit_options(parser, argv)
    conflicts = optimizer_conflicts(recipe_args.optimizer, vars(training_args), explicit)
    if conflicts:
        parser.error(f"--optimizer {recipe_args.optimizer or 'esam'} contradicts {', '.join(conflicts)}: a run is "
                     "labelled by its optimizer, so drop one of them.")
    if not explicit & {"do_train", "do_eval", "do_predict"}:  # neither given: train and evaluate
        training_args.do_train, training_args.do_eval = True, not no_eval
    return parsed


def main(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str = PROG,
         default_recipe: str | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Parse the options (over `defaults`, or `default_recipe`'s without `--recipe`), train with the extra
    TrainerCallbacks `callbacks` (e.g. a profiler), print the results."""
    recipe_args, run_args, model_args, data_args, training_args = parse(argv, defaults, prog, default_recipe)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        usage_error(prog,
            f"started as {launched} processes (accelerate launch / torchrun), but there is no GPU here, so each process "
            f"would train its own model into one folder. Add --use_cpu for real {launched}-process DDP on CPU "
            "(gloo), or launch a single process.")
    if training_args.push_to_hub:  # hours of training must not end in a failed upload
        problem = hub_problem()
        if problem:
            usage_error(prog, f"--push_to_hub: {problem}. Train without --push_to_hub and push the saved folder later.")
    # "last" (TrainingArguments' own option): the newest complete checkpoint in output_dir.
    resume = True if training_args.resume_from_checkpoint == "last" else training_args.resume_from_checkpoint
    claim = None
    if training_args.should_save:
        try:
            claim = claim_output_dir(training_args.output_dir, run_settings(model_args, data_args, training_args),
                                     resume=resume, overwrite=run_args.overwrite_output_dir,
                                     protected=[data_args.dataset, os.path.abspath(data_args.dataset)])
            resume = resolve_checkpoint(training_args.output_dir, resume)
        except ValueError as e:
            if claim is not None:
                claim.release()
            usage_error(prog, str(e))
    label = f"{recipe_args.recipe} ({recipe_args.optimizer or 'esam'})" if recipe_args.recipe else model_args.model_name
    from .trainer import TrainingDiverged

    try:
        metrics = train_image_classifier(model_args, data_args, training_args, recipe=recipe_args.recipe or "custom",
                                         resume_from_checkpoint=resume, train=training_args.do_train,
                                         evaluate=training_args.do_eval, claim=claim,
                                         callbacks=[TimelineCallback(os.path.join(training_args.output_dir, TIMELINE)),
                                                    *(callbacks or [])])
    except TrainingDiverged as e:  # recorded as diverged in output_dir; no score to print
        print(f"{prog}: training diverged: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except FolderInTheWay as e:  # something appeared in the folder while the new run was being built
        usage_error(prog, str(e))
    finally:
        if claim is not None:
            claim.release()
    if training_args.should_save:
        seconds, images_per_s = training_throughput(training_args.output_dir, metrics)
        print(results_table({label: {**metrics, "train_seconds": seconds, "images_per_s": images_per_s}}))
        print(f"\nSaved to {training_args.output_dir}: model, preprocessing config and model card (README.md)")
    return metrics


def hub_problem() -> str | None:
    """Why a push to the Hub would fail (offline mode, no network, no token), or None."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1), so nothing can be uploaded"
    try:
        HfApi().whoami()
    except Exception as e:  # no token, a bad token, or no network: each its own exception type
        return f"the Hub cannot be reached with your credentials ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def results_table(runs: dict[str, dict]) -> str:
    """Markdown table of the metrics a user looks at first."""
    # Accuracies in percent, as the README's tables show them; training time and images/s without the
    # evaluations and checkpoints (from the run's timeline), as `reproduce` reports them.
    columns = [("eval_accuracy", "top-1 %"), ("eval_top5_accuracy", "top-5 %"), ("eval_loss", "eval loss"),
               ("train_loss", "train loss"), ("images_per_s", "images/s (training)"), ("train_seconds", "train s")]
    present = [(k, t) for k, t in columns if any(m.get(k) is not None for m in runs.values())]
    lines = ["| run | " + " | ".join(t for _, t in present) + " |", "|---" * (len(present) + 1) + "|"]

    def cell(key, value):
        if not isinstance(value, (int, float)):
            return str(value if value is not None else "")
        return f"{100 * value:.2f}" if key.endswith("accuracy") else f"{value:.4g}"

    for name, m in runs.items():
        cells = [cell(k, m.get(k)) for k, _ in present]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
