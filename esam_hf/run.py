"""Train an image classifier end to end: dataset + timm backbone + ESAMTrainer -> saved, carded model.

The examples and the `esam-hf train` command are thin argument parsers around
`train_image_classifier`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import build_datasets, cifar_data_config, load_splits, resolve_dataset
from .metrics import compute_metrics_fn
from .models import create_model
from .trainer import ESAMTrainer, ESAMTrainingArguments


@dataclass
class ModelArguments:
    model_name: str = field(default="cifar_resnet18", metadata={"help": "Any timm model name, or cifar_resnet18, cifar_wrn28_10, cifar_pyramidnet110."})
    pretrained: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights (needs the Hub)."})
    model_kwargs: str | None = field(default=None, metadata={"help": 'JSON dict of extra timm.create_model kwargs, e.g. \'{"drop_rate": 0.1}\'.'})
    channels_last: bool = field(default=False, metadata={"help": "Use the channels_last memory format (faster convolutions on GPUs)."})


@dataclass
class DataArguments:
    dataset: str = field(default="cifar10", metadata={"help": "cifar10, cifar100, imagenet, cifar10-subset, a Hub id or a local directory."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (built in for the known datasets)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (built in for the known datasets)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a class-balanced subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a class-balanced subset of this size."})
    cutout: bool = field(default=True, metadata={"help": "CIFAR: Cutout 16px with p=0.5 (the paper's augmentation)."})
    random_crop: bool = field(default=True, metadata={"help": "CIFAR: random crop 32 with 4px padding."})
    horizontal_flip: bool = field(default=True, metadata={"help": "CIFAR: random horizontal flip."})


def build_model_and_data(model_args: ModelArguments, data_args: DataArguments, seed: int = 0):
    """Resolve the dataset, build the model for its classes, and the data pipeline that matches the
    model's input config (so training transforms and the saved image processor agree)."""
    spec = resolve_dataset(data_args.dataset, data_args.image_column, data_args.label_column)
    # The model needs the class names and the pipeline needs the model's data config; this first,
    # validating read is answered from the datasets cache when build_datasets loads the splits again.
    class_names = load_splits(spec, max_train_samples=1, max_eval_samples=1, seed=seed)[2]
    kwargs = json.loads(model_args.model_kwargs) if model_args.model_kwargs else {}
    if spec.kind == "cifar":  # normalisation statistics of this CIFAR, stored in the saved config
        stats = cifar_data_config(len(class_names))
        kwargs.setdefault("pretrained_cfg_overlay", {"mean": tuple(stats["mean"]), "std": tuple(stats["std"])})
    model = create_model(model_args.model_name, class_names, pretrained=model_args.pretrained, **kwargs)
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = build_datasets(
        spec, dict(model.config.pretrained_cfg), max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples, seed=seed, crop=data_args.random_crop,
        flip=data_args.horizontal_flip, cutout=data_args.cutout,
    )
    return spec, model, data


def paper_sgd(model: torch.nn.Module, args: ESAMTrainingArguments) -> torch.optim.SGD:
    """The authors' SGD: momentum 0.9 (or `--optim_args momentum=X`), weight decay on every parameter."""
    options = dict(kv.split("=") for kv in (args.optim_args or "").replace(" ", "").split(",") if kv)
    return torch.optim.SGD(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                           momentum=float(options.get("momentum", 0.9)), nesterov=options.get("nesterov", "") in ("true", "True", "1"))


def make_trainer(model_args: ModelArguments, data_args: DataArguments, training_args: ESAMTrainingArguments,
                 trainer_cls=ESAMTrainer, **trainer_kwargs) -> ESAMTrainer:
    """An ESAMTrainer (or `trainer_cls`) wired to the model, data and top-1/top-5 metrics.
    `optim="sgd"` means the paper's SGD (`paper_sgd`), not the Trainer's momentum-free default."""
    training_args.remove_unused_columns = False  # datasets already yield model inputs; nothing to prune
    _, model, data = build_model_and_data(model_args, data_args, training_args.seed)
    top_k = (1, 5) if len(data.class_names) >= 10 else (1,)
    if training_args.optim == "sgd":
        trainer_kwargs.setdefault("optimizers", (paper_sgd(model, training_args), None))
    return trainer_cls(
        model=model, args=training_args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
        data_collator=data.collator, compute_metrics=compute_metrics_fn(top_k), **trainer_kwargs,
    )


def train_image_classifier(model_args: ModelArguments, data_args: DataArguments, training_args: ESAMTrainingArguments,
                           recipe: str = "custom", resume_from_checkpoint: str | bool | None = None,
                           callbacks: list | None = None) -> dict[str, Any]:
    """Train, evaluate, save the model (with its image processor config and card) to `output_dir`.

    Returns the final metrics: train throughput and eval accuracy."""
    trainer = make_trainer(model_args, data_args, training_args, callbacks=callbacks)
    train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model()
    trainer.save_state()
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    kwargs = {"dataset": data_args.dataset, "recipe": recipe, "model_name": os.path.basename(os.path.normpath(training_args.output_dir))}
    trainer.create_model_card(**kwargs)
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    return metrics


def main(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, recipe: str = "custom",
         prog: str | None = None) -> dict[str, Any]:
    """Parse model, data and ESAMTrainingArguments flags (over `defaults`), train, print the results."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, ESAMTrainingArguments), prog=prog)
    parser.set_defaults(**{"remove_unused_columns": False, "report_to": "none", **(defaults or {})})
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    # TrainingArguments' own --resume_from_checkpoint; "last" picks the newest checkpoint in output_dir.
    resume = True if training_args.resume_from_checkpoint == "last" else training_args.resume_from_checkpoint
    metrics = train_image_classifier(model_args, data_args, training_args, recipe=recipe, resume_from_checkpoint=resume)
    if training_args.should_save:
        print(results_table({f"{recipe if recipe != 'custom' else model_args.model_name}": metrics}))
        print(f"\nSaved to {training_args.output_dir}: model, preprocessing config and model card (README.md)")
    return metrics


def results_table(runs: dict[str, dict]) -> str:
    """Markdown table of the metrics a user looks at first."""
    columns = [("eval_accuracy", "top-1"), ("eval_top5_accuracy", "top-5"), ("eval_loss", "eval loss"),
               ("train_loss", "train loss"), ("train_samples_per_second", "images/s"), ("train_runtime", "train s")]
    present = [(k, t) for k, t in columns if any(k in m for m in runs.values())]
    lines = ["| run | " + " | ".join(t for _, t in present) + " |", "|---" * (len(present) + 1) + "|"]
    for name, m in runs.items():
        cells = [f"{m[k]:.4g}" if isinstance(m.get(k), float) else str(m.get(k, "")) for k, _ in present]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
