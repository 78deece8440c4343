"""Model cards for `ESAMTrainer` runs, with metadata the Hugging Face Hub understands.

* Image classifiers get `model_cards/image_classification.md`: a readable ESAM card whose YAML
  header is built with `huggingface_hub` (`ModelCardData`, `EvalResult`): `library_name`,
  `pipeline_tag`, `base_model`, `datasets` (Hub ids only), `metrics` and a `model-index` with the
  top-1/top-5 accuracies on the evaluation split (its name and size; "subset" when it is one).
  `save_image_processor` writes the image processor next to the model; `image_processor` is the one to pass
  to the Trainer as `processing_class`, so that checkpoints carry it too.
* Every other model gets the Trainer's own card (`Trainer.create_model_card`: task, dataset,
  metrics, `finetuned_from`) plus `model_cards/esam_section.md` (`add_esam_section`).

`ESAMTrainer.create_model_card` (and so `push_to_hub`) picks one of the two. This module does not
import `esam_hf.trainer`: the ESAM hyper-parameters come in as a dict (`esam_config(args)`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from string import Template
from typing import Any

from . import recipes

IMAGE_TASK = "image-classification"
LIBRARY_TAG = "esam-hf"
PREPROCESSOR_NAME = "preprocessor_config.json"
# Metric ids in `model-index`: the Hub's `accuracy` for top-1; no Hub metric id exists for top-k,
# so `top_{k}_accuracy` (with a readable name), as `esam_hf.metrics` names them.
_TOPK_KEY = re.compile(r"^top_?(\d+)_accuracy$")
_ESAM_DEFAULTS = {"adaptive": False, "bn_stats": "clean", "selection": "sharpness", "gamma_warmup": 0.0,
                  "gamma_schedule": "linear"}
_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet-1k"}
_TRAINER_TEXT_START = "\n## Model description"  # where the Trainer's card body turns to boilerplate
_FRAMEWORK_VERSIONS = "### Framework versions"


# --------------------------------------------------------------------------- #
# What the run trained
# --------------------------------------------------------------------------- #
def esam_settings(esam: Mapping[str, Any]) -> dict[str, Any]:
    """ESAM hyper-parameters without the `esam_` prefix (`esam_config(args)` or `esam_config(args, prefix=False)`)."""
    settings = {**_ESAM_DEFAULTS, **{k.removeprefix("esam_"): v for k, v in esam.items()}}
    missing = [k for k in ("rho", "beta", "gamma") if k not in settings]
    if missing:
        raise ValueError(f"ESAM settings lack {missing}; pass esam=esam_hf.trainer.esam_config(args)")
    return settings


def method_of(esam: Mapping[str, Any]) -> str:
    """"sgd" (rho = 0: the base optimizer alone), "sam" (beta = gamma = 1) or "esam"."""
    return recipes.method_of({f"esam_{k}": v for k, v in esam_settings(esam).items()})


def method_label(esam: Mapping[str, Any]) -> str:
    """The method a run trained, for people: "SGD baseline (rho = 0)", "SAM (rho = 0.05)", "ESAM (...)"."""
    s, method = esam_settings(esam), method_of(esam)
    if method == "sgd":
        return "SGD baseline (rho = 0)"
    name = ("ASAM" if s["adaptive"] else "SAM") if method == "sam" else ("ESAM (adaptive)" if s["adaptive"] else "ESAM")
    if method == "sam":
        return f"{name} (rho = {s['rho']})"
    details = [f"rho = {s['rho']}", f"beta = {s['beta']}", f"gamma = {s['gamma']}"]
    if s["selection"] != "sharpness":
        details.append(f"{s['selection']} selection")
    if s["gamma_warmup"] > 0 and s["gamma"] < 1:
        details.append(f"gamma warm-up {s['gamma_warmup']:.0%}")
    return f"{name}, {', '.join(details)}"


def method_text(esam: Mapping[str, Any]) -> str:
    """What the method did in this run, in a paragraph."""
    s, method = esam_settings(esam), method_of(esam)
    if method == "sgd":
        return ("With rho = 0 this run is plain training with the base optimizer (the SGD baseline): "
                "no perturbation, one forward and backward pass per step.")
    if method == "sam":
        text = ("With beta = gamma = 1 this run is SAM: every step takes the gradient, perturbs every weight by "
                "rho along it and descends with the gradient at the perturbed weights on the whole batch.")
        return text + (" The perturbation is scaled per weight (ASAM)." if s["adaptive"] else "")
    text = ("ESAM: each step perturbs a random beta-fraction of the parameter tensors by rho/beta along the "
            "gradient (Stochastic Weight Perturbation) and descends on the gamma-fraction of the batch ")
    text += {
        "sharpness": "whose loss rises most under the perturbation (Sharpness-sensitive Data Selection).",
        "loss": "with the highest loss at the perturbed weights (`loss` selection instead of instance sharpness).",
        "random": "drawn uniformly at random (`random` selection instead of instance sharpness).",
    }.get(s["selection"], f"selected by `{s['selection']}`.")
    if s["beta"] == 1:
        text += " With beta = 1 every weight is perturbed (no SWP)."
    if s["gamma"] == 1:
        text += " With gamma = 1 the whole batch is used (no SDS)."
    elif s["gamma_warmup"] > 0:
        text += (f" The selected fraction starts at the whole batch and reaches gamma after "
                 f"{s['gamma_warmup']:.0%} of training ({s['gamma_schedule']}).")
    if s["adaptive"]:
        text += " The perturbation is scaled per weight (ASAM)."
    return text


def method_tags(esam: Mapping[str, Any]) -> list[str]:
    return {"sgd": [], "sam": ["sam"], "esam": ["esam", "sam"]}[method_of(esam)]


def _esam_table(esam: Mapping[str, Any]) -> str:
    s = esam_settings(esam)
    warmup = f"{s['gamma_warmup']} ({s['gamma_schedule']})" if s["gamma_warmup"] > 0 else "none"
    return ("| rho | beta (SWP) | gamma (SDS) | adaptive (ASAM) | BatchNorm statistics | SDS selection | gamma warm-up |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {s['rho']} | {s['beta']} | {s['gamma']} | {s['adaptive']} | {s['bn_stats']} | {s['selection']} | {warmup} |")


# --------------------------------------------------------------------------- #
# What the trainer knows
# --------------------------------------------------------------------------- #
def _unwrap(trainer):
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(trainer.model) if accelerator is not None else trainer.model


def run_precision(trainer) -> str:
    """The precision the run trained in: the accelerator's mixed precision (which also reflects
    `accelerate launch` / ACCELERATE_MIXED_PRECISION, not only `--bf16`/`--fp16`) and the weights' dtype."""
    import torch

    args = trainer.args
    accelerator = getattr(trainer, "accelerator", None)
    mixed = getattr(accelerator, "mixed_precision", None) if accelerator is not None else None
    if mixed is None:
        mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    dtype = next((p.dtype for p in _unwrap(trainer).parameters() if p.is_floating_point()), torch.float32)
    weights = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))
    if mixed not in (None, "no") and accelerator is not None and not getattr(accelerator, "native_amp", True):
        # e.g. fp16 on a CPU: accelerate runs no autocast and no GradScaler, so the run trained in `weights`.
        return f"{weights} ({mixed} was requested; it does not run on this device, so none was used)"
    text = weights if mixed in (None, "no") else f"{mixed} mixed precision (autocast, {weights} weights)"
    if getattr(args, "tf32", None):
        text += ", TF32 matmuls"
    return text


def _describe_optimizer(optimizer) -> str:
    group = optimizer.param_groups[0]
    extras = [f"{k} {group[k]}" for k in ("momentum", "betas", "nesterov") if group.get(k)]
    return type(optimizer).__name__ + (f" ({', '.join(extras)})" if extras else "")


def training_summary(trainer) -> dict[str, Any]:
    """Hyper-parameters and throughput of the run, for the card's "Training" table."""
    args, history = trainer.args, trainer.state.log_history
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    rows = {
        "optimizer": _describe_optimizer(optimizer) if optimizer is not None else args.optim,
        "learning rate": args.learning_rate,
        "learning-rate schedule": scheduler + (f", warm-up {args.warmup_steps}" if args.warmup_steps else ""),
        "weight decay": args.weight_decay,
        "training length": f"{args.num_train_epochs} epochs" if args.max_steps <= 0 else f"{args.max_steps} steps",
        "optimizer steps": trainer.state.global_step,
        "batch size (global)": args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size),
        "precision": run_precision(trainer),
        "seed": args.seed,
    }
    if args.label_smoothing_factor:
        rows["label smoothing"] = args.label_smoothing_factor
    if args.world_size > 1:
        rows["devices"] = args.world_size
    summary = next((h for h in reversed(history) if "train_samples_per_second" in h), {})
    if "train_loss" in summary:
        rows["final train loss (mean over the run)"] = summary["train_loss"]
    seconds, per_second = training_time(trainer, summary)
    if per_second is not None:
        rows.update({"training time (s, without evaluation)": seconds,
                     "throughput (examples/s, without evaluation)": per_second} if seconds is not None else
                    {"throughput (examples/s, whole `train()`, evaluations during it included)": per_second})
    return rows


def training_time(trainer, summary: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(seconds, examples/s) of training alone, evaluations and checkpoints excluded, from the run's
    `timeline.json` (`esam_hf.timeline.TimelineCallback`, as the README's tables and `esam-hf train`'s report
    them), when it records this run up to its last step; else `(None, the Trainer's examples/s)`, which
    counts the evaluations during `train()`."""
    from .run_folder import read_json
    from .timeline import TIMELINE, training_throughput

    output_dir = trainer.args.output_dir
    epochs = (read_json(os.path.join(output_dir, TIMELINE), None) or {}).get("epochs") or [{}]
    if epochs[-1].get("step") == trainer.state.global_step:  # this run's, not none or another run's
        seconds, per_second = training_throughput(output_dir)
        if per_second is not None:
            return seconds, per_second
    return None, summary.get("train_samples_per_second")


def eval_metrics(trainer) -> dict[str, Any]:
    """The last evaluation's metrics (`eval_accuracy`, `eval_top5_accuracy`, `eval_loss`, ...)."""
    for entry in reversed(trainer.state.log_history):
        found = {k: v for k, v in entry.items()
                 if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}
        if found:
            return found
    return {}


def framework_versions(*, timm: bool = True) -> dict[str, str]:
    """Versions of what trained the model: PyTorch, Transformers, timm, Datasets, esam_hf."""
    import torch
    import transformers

    versions = {"PyTorch": torch.__version__, "Transformers": transformers.__version__}
    for label, module in (("timm", "timm"), ("Datasets", "datasets")):
        if module == "timm" and not timm:
            continue
        try:
            versions[label] = __import__(module).__version__
        except ImportError:
            pass
    from . import __version__

    versions["esam_hf"] = __version__
    return versions


def _list_versions(versions: Mapping[str, str]) -> str:
    return "\n".join(f"- {name} {version}" for name, version in versions.items())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rows(values: Mapping[str, Any]) -> str:
    return "\n".join(f"| {k} | {_fmt(v)} |" for k, v in values.items()) or "| (none) | |"


def _listify(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# --------------------------------------------------------------------------- #
# Datasets and evaluation
# --------------------------------------------------------------------------- #
def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(os.path.expanduser(name)) or name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_card_dataset(dataset: str | None, dataset_name: str | None = None, eval_split: str | None = None) -> dict[str, Any]:
    """`{"hub_id", "path", "name", "eval_split"}` for a dataset given as a Hub id, a local path or an
    `esam_hf` alias (`cifar10` -> `uoft-cs/cifar10`). Only Hub ids go into the card's metadata."""
    if not dataset:
        return {"hub_id": None, "path": None, "name": dataset_name, "eval_split": eval_split}
    name, path = dataset_name, dataset
    try:
        from .data import BUILTIN_DATASETS
    except ImportError:  # pragma: no cover
        BUILTIN_DATASETS = {}
    spec = BUILTIN_DATASETS.get(dataset)
    if spec is not None:
        path, eval_split = spec.path, eval_split or spec.eval_split
        name = name or _DATASET_NAMES.get(dataset, dataset)
    if _is_hub_id(path):
        return {"hub_id": path, "path": None, "name": name or path, "eval_split": eval_split}
    local = os.path.basename(os.path.normpath(path))
    if name and ("/" in name or os.sep in name or os.path.exists(name)):  # a path, which a card must not publish
        name = os.path.basename(os.path.normpath(name))
    return {"hub_id": None, "path": path, "name": name or (dataset if spec is not None else local), "eval_split": eval_split}


def _evaluation(eval_split: str | None, eval_samples: int | None, eval_split_size: int | None,
                unit: str = "images") -> tuple[str, str, bool]:
    """(table cell, results sentence, is a subset) for the evaluation split and its size."""
    split = f"`{eval_split}` split" if eval_split else "evaluation set"
    subset = eval_samples is not None and eval_split_size is not None and eval_samples < eval_split_size
    if subset:
        cell = f"{eval_samples} of the {eval_split_size} {unit} of the {split} (a subset)"
        note = (f"Evaluated on **{eval_samples} of the {eval_split_size} {unit}** of the {split}: a subset, so the "
                "numbers below are noisier than, and not directly comparable with, results on the full split.")
    elif eval_samples is not None:
        cell = f"{split}, {eval_samples} {unit}" + (" (the full split)" if eval_split_size is not None else "")
        note = f"Evaluated on the {split} ({eval_samples} {unit}" + (", all of it)." if eval_split_size is not None else ").")
    else:
        cell, note = split, f"Evaluated on the {split}."
    return cell, note, subset


def _metric_name(key: str) -> tuple[str, str] | None:
    """(`model-index` metric type, readable name) for an eval metric key, or None to leave it out."""
    key = key.removeprefix("eval_")
    if key == "accuracy":
        return "accuracy", "Top-1 accuracy"
    if key == "loss":
        return None
    match = _TOPK_KEY.match(key)
    if match:
        k = int(match.group(1))
        return f"top_{k}_accuracy", f"Top-{k} accuracy"
    return None


def _subset_suffix(eval_split, eval_samples, eval_split_size, unit="images") -> str:
    """" (40 of 1000 test images)" when the evaluation used a subset of its split, else ""."""
    if eval_samples is not None and eval_split_size is not None and eval_samples < eval_split_size:
        return f" ({eval_samples} of {eval_split_size} {eval_split or 'evaluation'} {unit})"
    return ""


def eval_results(metrics: Mapping[str, Any], *, task: str, dataset_id: str, dataset_name: str,
                 eval_split: str | None = None, dataset_config: str | None = None,
                 eval_samples: int | None = None, eval_split_size: int | None = None) -> list:
    """`huggingface_hub.EvalResult`s for the accuracy metrics in `metrics` (model-index entries)."""
    from huggingface_hub import EvalResult

    suffix = _subset_suffix(eval_split, eval_samples, eval_split_size)
    results = []
    for key, value in metrics.items():
        named = _metric_name(key)
        if named is None or not isinstance(value, (int, float)):
            continue
        results.append(EvalResult(
            task_type=task, task_name=task.replace("-", " ").title(), dataset_type=dataset_id, dataset_name=dataset_name,
            dataset_config=dataset_config, dataset_split=eval_split, metric_type=named[0], metric_name=named[1] + suffix,
            metric_value=float(value),
        ))
    return results


# --------------------------------------------------------------------------- #
# The image-classification card
# --------------------------------------------------------------------------- #
def is_image_classifier(model, tasks=None) -> bool:
    """A timm backbone in transformers' wrapper: the models esam_hf's image card describes (preprocessing in
    `pretrained_cfg`, the timm backbone). Any other image classifier (ViT, ConvNeXt, ... with
    `tasks="image-classification"`, as the transformers image example passes) gets the Trainer's own card,
    which carries its dataset and `model-index`, plus the ESAM section."""
    try:
        from transformers import TimmWrapperForImageClassification
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, TimmWrapperForImageClassification)


def _input_size(config) -> int:
    """The image side the model's preprocessing works at (its `pretrained_cfg` input size; 224 otherwise)."""
    size = (getattr(config, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    return int(size[-1])


def _needs_esam_models(architecture: str | None) -> bool:
    try:
        from .models import CIFAR_MODELS
    except ImportError:  # pragma: no cover
        return False
    return bool(architecture) and architecture.split(".")[0] in CIFAR_MODELS


def render_model_card(
    trainer,
    *,
    esam: Mapping[str, Any],
    model_name: str,
    dataset: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    eval_split: str | None = None,
    eval_samples: int | None = None,
    eval_split_size: int | None = None,
    recipe: str | None = None,
    finetuned_from: str | None = None,
    resumed_from: Mapping[str, Any] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    folder: str | None = None,
) -> str:
    """The image-classification card (YAML metadata + markdown) of a finished trainer's run; its "Use"
    snippet loads the model from its Hub id (`hub_model_id`) or, without one, from `./<folder>`
    (default: the output folder's name)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_id = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id  # the Trainer's, once it pushed
    folder = folder or os.path.basename(os.path.normpath(trainer.args.output_dir))
    model = _unwrap(trainer)
    config = getattr(model, "config", None)
    architecture = getattr(config, "architecture", None)
    is_timm = architecture is not None and hasattr(config, "pretrained_cfg")
    if finetuned_from is None:  # a model loaded from the Hub by id, as the Trainer infers it
        source = getattr(config, "_name_or_path", "") or ""
        finetuned_from = source if source and not os.path.isdir(source) else None
    if eval_samples is None and trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, dict):
        try:
            eval_samples = len(trainer.eval_dataset)
        except TypeError:
            pass
    ds = resolve_card_dataset(dataset, dataset_name, eval_split)
    eval_split = ds["eval_split"]
    metrics = eval_metrics(trainer)
    num_classes = getattr(config, "num_labels", None) or "?"

    results = []
    if metrics and (ds["hub_id"] or ds["name"]):
        # A local dataset still gets results, under its name (no Hub id to link; not in `datasets:`).
        dataset_type = ds["hub_id"] or re.sub(r"[^\w.-]+", "-", ds["name"]).strip("-").lower()
        results = eval_results(metrics, task=IMAGE_TASK, dataset_id=dataset_type, dataset_name=ds["name"],
                               eval_split=eval_split, dataset_config=dataset_config,
                               eval_samples=eval_samples, eval_split_size=eval_split_size)
    if license is None and not finetuned_from:
        license = "apache-2.0"  # trained from scratch by esam_hf; a fine-tune inherits its base model's terms
    all_tags = list(dict.fromkeys(method_tags(esam) + [LIBRARY_TAG] + (["timm"] if is_timm else []) + [IMAGE_TASK]
                                  + _listify(tags)))
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag=IMAGE_TASK, license=license, language=language or None,
        base_model=finetuned_from or None, datasets=[ds["hub_id"]] if ds["hub_id"] else None,
        metrics=sorted({r.metric_type for r in results}, key=lambda m: (m != "accuracy", m)) or None,
        tags=all_tags, model_name=model_name, eval_results=results or None,
    )

    if ds["hub_id"]:
        dataset_cell = f"[{ds['name']}](https://huggingface.co/datasets/{ds['hub_id']})"
    elif ds["path"]:
        dataset_cell = f"`{ds['name']}` (local data, not on the Hub)"
    else:
        dataset_cell = f"`{ds['name']}`" if ds["name"] else "unknown"
    evaluation, results_note, _ = _evaluation(eval_split, eval_samples, eval_split_size)
    if not metrics:
        results_note = "No evaluation was run."
    if finetuned_from:
        initial = f"[{finetuned_from}](https://huggingface.co/{finetuned_from}) (fine-tuned; check its license)"
    else:
        initial = "random (trained from scratch)"
    if resumed_from:
        step = f" at step {resumed_from['step']}" if resumed_from.get("step") is not None else ""
        by = f" of a {resumed_from['method']} run" if resumed_from.get("method") else ""
        initial += f"; training resumed from a checkpoint{step}{by}"
    backbone = f"`{architecture}` (timm)" if is_timm else f"`{type(model).__name__}`"
    model_args = {k: v for k, v in (getattr(config, "model_args", None) or {}).items()
                  if k != "pretrained_cfg_overlay"}  # normalisation is stated with the preprocessing
    if model_args:
        backbone += ", " + ", ".join(f"`{k}={v}`" for k, v in model_args.items())
    backbone += f"; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
    metric_rows = {}
    for key, value in metrics.items():
        named = _metric_name(key)
        if named and isinstance(value, (int, float)):  # in %, as tables of results show it (model-index: a fraction)
            metric_rows[f"{named[1]}, % (`{key}`)"] = f"{100 * value:.2f}"
            continue
        label = "Loss" if key == "eval_loss" else None
        metric_rows[f"{label} (`{key}`)" if label else f"`{key}`"] = value

    template = Template(resources.files("esam_hf.model_cards").joinpath("image_classification.md").read_text())
    text = template.substitute(
        card_data=card_data.to_yaml(), model_name=model_name, method_label=method_label(esam), backbone=backbone,
        initial_weights=initial, dataset=dataset_cell, num_classes=num_classes, evaluation=evaluation,
        recipe=recipe or "custom", method=f"**{method_label(esam)}.** {method_text(esam)}", esam_table=_esam_table(esam),
        training=_rows(training_summary(trainer)), results_note=results_note, metrics=_rows(metric_rows),
        use_setup=("transformers and timm are all it needs: the backbone's code ships with the model "
                   "(`modeling_esam_cifar.py` and the files it imports, named in `config.json`'s `auto_map`), hence "
                   "`trust_remote_code=True`; read them before you trust them. With `esam_hf` installed, "
                   "`import esam_hf.models` first and leave it out.\n\n")
        if _needs_esam_models(architecture) else "",
        remote_code=", trust_remote_code=True" if _needs_esam_models(architecture) else "",
        remote_code_why=("\n# trust_remote_code=True: the model's code travels with it (modeling_esam_cifar.py), "
                         "so it needs no esam_hf") if _needs_esam_models(architecture) else "",
        model_id=hub_id or f"./{folder}", image_size=_input_size(config),
        use_where="" if hub_id else (f"`./{folder}` is this card's folder, as seen from the folder that holds it: run this "
                                     f"there, or give its path from elsewhere, or its Hub id once it is pushed.\n\n"),
        versions=_list_versions(framework_versions(timm=is_timm)),
    )
    return str(ModelCard(text))  # parses the metadata back: a malformed header fails here, not on the Hub


def write_model_card(
    trainer,
    output_dir: str | None = None,
    *,
    esam: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    **card: Any,
) -> str:
    """Write the image-classification card as README.md in `output_dir` (default `args.output_dir`); return its path.

    Args:
        esam: the run's ESAM hyper-parameters, `esam_hf.trainer.esam_config(trainer.args)` (read from
            `trainer.args`' `esam_*` fields when omitted).
        dataset: the dataset's Hub id (`uoft-cs/cifar10`, goes into `datasets:` and `model-index`), a local
            path (named in the card's text only) or an esam_hf alias (`cifar10`, `cifar10-subset`).
        dataset_name: display name (default: from the alias, else the id or the folder name).
        dataset_config: the dataset configuration, if any (`model-index`).
        eval_split: the split evaluated on (`test`, `validation`).
        eval_samples: how many examples were evaluated (default: `len(trainer.eval_dataset)`).
        eval_split_size: how many the full split has; `eval_samples < eval_split_size` is reported as a subset.
        recipe: the recipe name (`custom` when omitted).
        finetuned_from: Hub id of the starting weights (`timm/resnet50.a1_in1k` with `--pretrained`): `base_model`.
        resumed_from: `{"step", "method"}` of the checkpoint the run resumed from, stated with the initial weights.
        license: default `apache-2.0` when trained from scratch, none for a fine-tune (its base model's terms).
        language, tags: card metadata (the method's tags, `esam-hf`, `timm` and the task are always added).
        (All but `esam` and `model_name` pass to `render_model_card` as they are.)
    """
    output_dir = output_dir or trainer.args.output_dir
    if esam is None:
        esam = {k: v for k, v in vars(trainer.args).items() if k.startswith("esam_")}
    folder = os.path.basename(os.path.normpath(output_dir))
    text = render_model_card(trainer, esam=esam, model_name=model_name or folder, folder=folder, **card)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def image_processor(model):
    """The image processor of a timm-wrapper model (None for other models) that writes
    `preprocessor_config.json` when saved: pass it to the Trainer as `processing_class`, and every
    checkpoint, like the final folder, loads as a model folder (`AutoImageProcessor`, `pipeline`).

    `TimmWrapperImageProcessor.save_pretrained` deliberately writes nothing: transformers reads a timm
    model's preprocessing from `config.json` (`pretrained_cfg`), locally and from the Hub. The file says
    which processor to build (`image_processor_type`: transformers' own, so loading needs no esam_hf) and
    holds the same `pretrained_cfg` (plus the resolved `data_config`: size, crop, interpolation, mean, std),
    so tools that look for a preprocessor config find one and the processor can be built from it alone.
    """
    config = getattr(model, "config", model)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if not pretrained_cfg:
        return None
    return _saving_processor_class()(pretrained_cfg=dict(pretrained_cfg), architecture=config.architecture)


@functools.cache
def _saving_processor_class():
    from transformers import TimmWrapperImageProcessor

    class SavingTimmWrapperImageProcessor(TimmWrapperImageProcessor):
        """`TimmWrapperImageProcessor` whose `save_pretrained` writes `preprocessor_config.json` (see `image_processor`)."""

        def __init__(self, pretrained_cfg: dict, **kwargs):
            super().__init__(pretrained_cfg, **kwargs)
            self.pretrained_cfg = dict(pretrained_cfg)  # an attribute, so `to_dict` (the saved file) carries it

        def save_pretrained(self, save_directory, **kwargs) -> list[str]:
            content = {**self.to_dict(), "image_processor_type": TimmWrapperImageProcessor.__name__}
            os.makedirs(save_directory, exist_ok=True)
            path = os.path.join(save_directory, PREPROCESSOR_NAME)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(content, indent=2, sort_keys=True) + "\n")
            return [path]

    return SavingTimmWrapperImageProcessor


def save_image_processor(model, output_dir: str) -> str | None:
    """Write `preprocessor_config.json` (see `image_processor`) for a timm-wrapper model; return its path
    (None for other models)."""
    processor = image_processor(model)
    return processor.save_pretrained(output_dir)[0] if processor is not None else None


# --------------------------------------------------------------------------- #
# Every other model: the Trainer's card plus an ESAM section
# --------------------------------------------------------------------------- #
def infer_task(model) -> str | None:
    """The pipeline task of a transformers model, as `TrainingSummary.from_trainer` infers it."""
    try:
        from transformers.modelcard import TASK_MAPPING, _get_mapping_values
    except ImportError:  # pragma: no cover
        return None
    name = type(model).__name__
    return next((task for task, mapping in TASK_MAPPING.items() if name in _get_mapping_values(mapping)), None)


def trainer_card_arguments(dataset=None, dataset_tags=None, dataset_name=None, dataset_args=None, dataset_config=None):
    """Map this module's dataset convention onto the Trainer's: `dataset` may be a Hub id or a local path
    (`dataset_name` its display name); the Trainer wants Hub ids in `dataset_tags`, display names in `dataset`."""
    path = None
    if dataset_tags is None and isinstance(dataset, str):
        ds = resolve_card_dataset(dataset, dataset_name)
        dataset_tags, dataset, path = ds["hub_id"], ds["name"], ds["path"]
    elif dataset is None:
        dataset = dataset_name
    if dataset_args is None:
        dataset_args = dataset_config
    return {"dataset": dataset, "dataset_tags": dataset_tags, "dataset_args": dataset_args}, path


def add_esam_section(
    trainer,
    path: str | None = None,
    *,
    esam: Mapping[str, Any],
    tasks: str | list[str] | None = None,
    local_dataset: str | None = None,
    eval_split: str | None = None,
    eval_samples: int | None = None,
    eval_split_size: int | None = None,
    recipe: str | None = None,
) -> str:
    """Add the ESAM section, the method's tags, the `pipeline_tag` and esam_hf's version to the card
    `Trainer.create_model_card` wrote (`path`, default `output_dir/README.md`); return its path."""
    from huggingface_hub import ModelCard

    path = path or os.path.join(trainer.args.output_dir, "README.md")
    card = ModelCard.load(path)
    task_list = _listify(tasks)
    if len(task_list) == 1 and card.data.get("pipeline_tag") is None:
        card.data.pipeline_tag = task_list[0]
    card.data.tags = list(dict.fromkeys(_listify(card.data.tags) + method_tags(esam) + [LIBRARY_TAG]))
    suffix = _subset_suffix(eval_split, eval_samples, eval_split_size, "examples")
    for result in card.data.eval_results or []:  # the Trainer knows the split only of a `datasets.Dataset`
        if result.dataset_split is None and eval_split:
            result.dataset_split = eval_split
        if suffix and not (result.metric_name or "").endswith(suffix):
            result.metric_name = (result.metric_name or result.metric_type) + suffix

    training = training_summary(trainer)
    if recipe:
        training = {"recipe": recipe, **training}
    if local_dataset:
        training["dataset"] = f"local data `{local_dataset}` (not on the Hub)"
    if eval_split or eval_samples is not None:
        training["evaluation"] = _evaluation(eval_split, eval_samples, eval_split_size, "examples")[0]
    section = Template(resources.files("esam_hf.model_cards").joinpath("esam_section.md").read_text()).substitute(
        method_label=method_label(esam), method=method_text(esam), esam_table=_esam_table(esam), training=_rows(training),
    )
    # A model built from a config has `_name_or_path` "", which the Trainer reports as a fine-tune of "".
    text = card.text.replace("This model is a fine-tuned version of [](https://huggingface.co/) on",
                             "This model was trained from scratch on")
    if eval_split or eval_samples is not None:
        where = _evaluation(eval_split, eval_samples, eval_split_size, "examples")[0]
        text = text.replace("results on the evaluation set:", f"results on the evaluation set ({where}):", 1)
    at = text.find(_TRAINER_TEXT_START)
    text = text[:at + 1] + section + text[at + 1:] if at >= 0 else text.rstrip("\n") + "\n\n" + section
    from . import __version__

    at = text.find(_FRAMEWORK_VERSIONS)
    if at >= 0:  # after the last "- Name version" line of the Trainer's list
        lines = text[at:].split("\n")
        end = max((i for i, line in enumerate(lines) if line.startswith("- ")), default=1)
        lines.insert(end + 1, f"- esam_hf {__version__}")
        text = text[:at] + "\n".join(lines)
    else:
        text = text.rstrip("\n") + f"\n\n{_FRAMEWORK_VERSIONS}\n\n" + _list_versions(framework_versions(timm=False)) + "\n"
    card.text = text
    card.save(path)
    return path


# --------------------------------------------------------------------------- #
# The entry point of `ESAMTrainer.create_model_card` (and so of `push_to_hub`)
# --------------------------------------------------------------------------- #
def create_model_card(
    trainer,
    trainer_card=None,
    *,
    esam: Mapping[str, Any],
    language=None,
    license=None,
    tags=None,
    model_name=None,
    finetuned_from=None,
    tasks=None,
    dataset_tags=None,
    dataset=None,
    dataset_args=None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    eval_split: str | None = None,
    eval_samples: int | None = None,
    eval_split_size: int | None = None,
    recipe: str | None = None,
    resumed_from: Mapping[str, Any] | None = None,
) -> str:
    """Write `trainer`'s card to `output_dir/README.md`; return its path.

    The first ten arguments are `Trainer.create_model_card`'s; the rest describe the run (see
    `write_model_card`). `dataset` is a Hub id or a local path (`dataset_name` its display name); the
    Trainer's own convention (`dataset_tags` = Hub ids, `dataset` = display names) works too.
    Image classifiers get the image card and `preprocessor_config.json`; any other model gets
    `trainer_card(...)` (`Trainer.create_model_card`, unbound from the ESAMTrainer) plus `add_esam_section`.
    """
    model = _unwrap(trainer)
    if is_image_classifier(model, tasks):
        if dataset_tags is not None:  # the Trainer's convention
            dataset_name = dataset_name or (_listify(dataset) or [None])[0]
            dataset = _listify(dataset_tags)[0] if _listify(dataset_tags) else None
        elif isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        save_image_processor(model, trainer.args.output_dir)
        return write_model_card(
            trainer, esam=esam, model_name=model_name, dataset=dataset, dataset_name=dataset_name,
            dataset_config=dataset_config or (_listify(dataset_args) or [None])[0], eval_split=eval_split,
            eval_samples=eval_samples, eval_split_size=eval_split_size, recipe=recipe, finetuned_from=finetuned_from,
            resumed_from=resumed_from, license=license, language=language, tags=tags,
        )
    if trainer_card is None:
        raise ValueError(f"{type(model).__name__} is not an image classifier: pass trainer_card=Trainer.create_model_card")
    card_kwargs, local_dataset = trainer_card_arguments(dataset, dataset_tags, dataset_name, dataset_args, dataset_config)
    tasks = tasks or infer_task(model)
    trainer_card(language=language, license=license, tags=_listify(tags) or None, model_name=model_name,
                 finetuned_from=finetuned_from, tasks=tasks, **card_kwargs)
    return add_esam_section(trainer, esam=esam, tasks=tasks, local_dataset=local_dataset, eval_split=eval_split,
                            eval_samples=eval_samples, eval_split_size=eval_split_size, recipe=recipe)
