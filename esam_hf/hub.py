"""Model cards: fill `model_cards/image_classification.md` from a finished `ESAMTrainer`."""

from __future__ import annotations

import os
from importlib import resources
from string import Template
from typing import Any

CARD_TAGS = ["esam", "sam", "timm", "image-classification"]


def _method(config: dict[str, Any]) -> str:
    if config["esam_rho"] == 0:
        return "With rho = 0 this run is plain training with the base optimizer (the SGD baseline)."
    if config["esam_beta"] == 1 and config["esam_gamma"] == 1:
        return "With beta = gamma = 1 this run is SAM (both passes on every weight and every example)."
    text = ("ESAM: each step perturbs a random beta-fraction of the parameter tensors by "
            "rho/beta along the gradient and descends on the gamma-fraction of the batch "
            "whose loss rises most under the perturbation.")
    if config["esam_selection"] != "sharpness":
        text += f" Examples selected by `{config['esam_selection']}` instead of instance sharpness."
    if config["esam_gamma_warmup"] > 0:
        text += (f" The selected fraction starts at the whole batch and reaches gamma after "
                 f"{config['esam_gamma_warmup']:.0%} of training ({config['esam_gamma_schedule']}).")
    return text


def _rows(values: dict[str, Any]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(f"| {k} | {fmt(v)} |" for k, v in values.items()) or "| (none) | |"


def render_model_card(
    *,
    model_name: str,
    backbone: str,
    dataset: str,
    num_classes: int,
    esam: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, Any],
    recipe: str = "custom",
    model_id: str | None = None,
    tags: list[str] | None = None,
    license: str = "apache-2.0",
) -> str:
    """The filled card (YAML metadata + markdown) as a string."""
    template = Template(resources.files("esam_hf.model_cards").joinpath("image_classification.md").read_text())
    all_tags = list(dict.fromkeys(CARD_TAGS + list(tags or [])))
    return template.substitute(
        model_name=model_name, backbone=backbone, dataset=dataset, num_classes=num_classes, recipe=recipe,
        rho=esam["esam_rho"], beta=esam["esam_beta"], gamma=esam["esam_gamma"], adaptive=esam["esam_adaptive"],
        bn_stats=esam["esam_bn_stats"], method=_method(esam), training=_rows(training), metrics=_rows(metrics),
        model_id=model_id or model_name, tags="\n".join(f"- {t}" for t in all_tags), license=license,
    )


def _describe_optimizer(optimizer) -> str:
    group = optimizer.param_groups[0]
    extras = [f"{k} {group[k]}" for k in ("momentum", "betas", "nesterov") if group.get(k)]
    return type(optimizer).__name__ + (f" ({', '.join(extras)})" if extras else "")


def trainer_card_fields(trainer) -> dict[str, Any]:
    """What a card says about a trainer's run: backbone, hyper-parameters, last metrics, throughput."""
    from .trainer import esam_config

    args, model = trainer.args, trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model, "config", None)
    history = trainer.state.log_history
    metrics = {}
    for entry in history:
        metrics.update({k: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))})
    train_summary = next((h for h in reversed(history) if "train_samples_per_second" in h), {})
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    training = {
        "optimizer": _describe_optimizer(optimizer) if optimizer is not None else args.optim,
        "learning rate": args.learning_rate,
        "weight decay": args.weight_decay,
        "epochs": args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps",
        "batch size (global)": args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed,
    }
    if "train_samples_per_second" in train_summary:
        training["throughput (images/s, whole run)"] = train_summary["train_samples_per_second"]
    return {
        "backbone": getattr(config, "architecture", None) or type(model).__name__,
        "num_classes": getattr(config, "num_labels", None) or "?",
        "esam": esam_config(args),
        "training": training,
        "metrics": metrics,
    }


def write_model_card(trainer, output_dir: str | None = None, *, model_name: str | None = None,
                     dataset: str | list[str] | None = None, tags: list[str] | None = None,
                     recipe: str | None = None, license: str | None = None) -> str:
    """Write README.md (the card) into `output_dir` (default `args.output_dir`); return its path."""
    output_dir = output_dir or trainer.args.output_dir
    dataset = dataset[0] if isinstance(dataset, list) else dataset
    card = render_model_card(
        model_name=model_name or os.path.basename(os.path.normpath(output_dir)),
        dataset=dataset or "unknown", tags=tags, recipe=recipe or "custom",
        model_id=trainer.args.hub_model_id, license=license or "apache-2.0", **trainer_card_fields(trainer),
    )
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as f:
        f.write(card)
    return path
