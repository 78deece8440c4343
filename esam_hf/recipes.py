"""The paper's training recipes (Du et al., 2022, Table 1 and the authors' scripts), the
`--recipe`/`--optimizer` options that apply them, and how a run is named by what it trains."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("sgd", "sam", "esam")
GENERIC = "generic"
GENERIC_LR_PER_256 = 0.1
ANY = "any"  # the `generic` recipe's dataset and model
# ESAM arguments that make each optimizer what it is; esam keeps the recipe's (or the defaults').
# What each --optimizer fixes. SGD also turns SWP and SDS off, so that its record and card show nothing
# of ESAM active (at rho 0 they would change nothing anyway).
OPTIMIZER_ESAM_ARGS = {"sgd": {"esam_rho": 0.0, "esam_beta": 1.0, "esam_gamma": 1.0},
                       "sam": {"esam_beta": 1.0, "esam_gamma": 1.0}, "esam": {}}


def method_of(esam: dict[str, Any]) -> str:
    """What ESAM arguments train, by name: "sgd" (rho 0), "sam" (beta = gamma = 1) or "esam"."""
    if esam["esam_rho"] == 0:
        return "sgd"
    return "sam" if esam["esam_beta"] == 1 and esam["esam_gamma"] == 1 else "esam"


@dataclass(frozen=True)
class Recipe:
    dataset: str  # the `generic` recipe's are ANY: the dataset and model come from the command line
    model: str
    epochs: int
    batch_size: int  # global
    learning_rate: float
    weight_decay: float
    rho: float
    beta: float
    gamma: float
    note: str = ""
    model_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    # ESAM's rho when it differs from SAM's: SWP scales the perturbation of the kept tensors by 1/beta,
    # so rho * beta gives ESAM about SAM's perturbation size (None: the paper's choice, SAM's rho).
    esam_rho: float | None = None
    options: dict = field(default_factory=dict)  # further option defaults (data, schedule, selection)

    def esam_args(self, optimizer: str = "esam") -> dict:
        """ESAMTrainingArguments fields for `optimizer`: the same recipe as plain SGD
        (rho = 0), SAM (beta = gamma = 1) or ESAM."""
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        rho = self.esam_rho if optimizer == "esam" and self.esam_rho is not None else self.rho
        return {"esam_rho": rho, "esam_beta": self.beta, "esam_gamma": self.gamma, **OPTIMIZER_ESAM_ARGS[optimizer]}

    def training_args(self, optimizer: str = "esam", world_size: int = 1) -> dict:
        """TrainingArguments fields: SGD momentum 0.9 (set by the caller), cosine schedule, no warm-up."""
        return {
            "num_train_epochs": self.epochs,
            "per_device_train_batch_size": max(1, self.batch_size // world_size),
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0,
            **self.esam_args(optimizer),
        }


_CIFAR = {
    # model: (epochs, batch, lr, weight decay, rho, beta, gamma), from the authors' scripts
    "resnet18": ("cifar_resnet18", 200, 128, 0.05, 1e-3, 0.05, 0.6, 0.5),
    "wrn28-10": ("cifar_wrn28_10", 200, 256, 0.05, 1e-3, 0.1, 0.5, 0.5),
    "pyramidnet110": ("cifar_pyramidnet110", 300, 256, 0.05, 5e-4, 0.2, 0.5, 0.5),
}

# The paper's recipes train the paper's ESAM (sharpness selection); ESAMTrainer's default mode is
# `reproduce --methods esam_ascent` (SDS on the ascent at rho x beta), or --esam_selection ascent.
_PAPER = {"esam_selection": "sharpness"}
RECIPES: dict[str, Recipe] = {
    f"{dataset}-{short}": Recipe(dataset, *values, options=_PAPER)
    for dataset in ("cifar10", "cifar100")
    for short, values in _CIFAR.items()
}
_IMAGENET_NOTE = ("The authors never released their ImageNet recipe: this is the standard 90-epoch "
                  "SGD recipe (lr 0.1 per 256 images, weight decay 1e-4) with the CIFAR ESAM settings.")
RECIPES.update({
    "imagenet-resnet50": Recipe("imagenet", "resnet50", 90, 256, 0.1, 1e-4, 0.05, 0.6, 0.5, _IMAGENET_NOTE,
                                options=_PAPER),
    "imagenet-resnet101": Recipe("imagenet", "resnet101", 90, 256, 0.1, 1e-4, 0.05, 0.6, 0.5, _IMAGENET_NOTE,
                                 options=_PAPER),
    # Not from the paper: the README's offline CPU demo on the CIFAR-10 subset shipped in the package.
    # Its ESAM is ESAMTrainer's default mode (SDS on the ascent at rho 0.05 x beta = 0.03).
    "demo": Recipe("cifar10-subset", "cifar_resnet18", 10, 64, 0.05, 5e-4, 0.05, 0.6, 0.5,
                   "CPU demo: a quarter-width ResNet-18 on the CIFAR-10 subset shipped in the package; ESAM "
                   "in ESAMTrainer's default mode.",
                   model_kwargs={"channels": [16, 32, 64, 128]}, esam_rho=0.03,
                   options={"esam_selection": "ascent"}),
    # Not from the paper: a small CPU benchmark that a model over-fits (`benchmarks/accuracy.py study`):
    # 1,000 images (100 per class), no augmentation, 40 epochs; SAM at rho 0.2, ESAM at rho 0.12 = 0.2 x beta.
    "cpu-study": Recipe("cifar10-subset", "cifar_resnet18", 40, 64, 0.05, 5e-4, 0.2, 0.6, 0.5,
                        "CPU benchmark: a quarter-width ResNet-18 on 1,000 bundled CIFAR-10 images without "
                        "augmentation, trained to a loss near 0 (about 25 minutes for SGD, SAM and ESAM x 3 seeds "
                        "on 2 cores).",
                        model_kwargs={"channels": [16, 32, 64, 128]}, esam_rho=0.12,
                        options={"max_train_samples": 1000, "random_crop": False, "horizontal_flip": False,
                                 "cutout": False, "warmup_fraction": 0.25, "optim_args": "nesterov=true",
                                 "esam_selection": "ascent"}),
    # Not from the paper: for a model no recipe above has (e.g. a ViT), so that an example script never
    # trains it with another model's recipe under that recipe's name. The batch and learning rate follow
    # the linear scaling rule (Goyal et al., 2017); ESAM in ESAMTrainer's default mode.
    GENERIC: Recipe(ANY, ANY, 100, 128, GENERIC_LR_PER_256 * 128 / 256, 1e-4, 0.05, 0.6, 0.5,
                    f"For any model and dataset no other recipe covers: SGD momentum 0.9, learning rate "
                    f"{GENERIC_LR_PER_256:g} per 256 images (0.05 at its batch of 128; the example scripts and "
                    "`reproduce` scale it to the batch you set), weight decay 1e-4, cosine schedule with a 5% "
                    "warm-up, 100 epochs; ESAM in ESAMTrainer's default mode. A starting point, not a tuned recipe: "
                    "set what your model needs.",
                    esam_rho=0.03, options={"esam_selection": "ascent", "warmup_fraction": 0.05}),
})


def _option(argv: list[str], name: str) -> str | None:
    """The value of `--name X` or `--name=X` in argv (the last one), or None."""
    value = None
    for i, token in enumerate(argv):
        if token == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


def default_recipe_for(argv: list[str], fallback: str) -> str:
    """The recipe whose dataset and model the command line names (`--dataset cifar100 --model_name
    cifar_wrn28_10` -> cifar100-wrn28-10), else `fallback`'s with the named dataset, else `fallback`."""
    dataset, model = _option(argv, "dataset"), _option(argv, "model_name")
    base = RECIPES[fallback]
    for name, r in RECIPES.items():
        if r.dataset == (dataset or base.dataset) and r.model == (model or base.model):
            return name
    return fallback


def example_recipe(dataset: str | None, model: str | None, fallback: str) -> str:
    """The recipe an example script starts from without `--recipe`: the one for the named `model` (default
    `fallback`'s) on the named `dataset` (default `fallback`'s), else `fallback` or another recipe for that
    model on its own dataset, else `generic`: a model without a recipe never gets another model's."""
    base = get_recipe(fallback)
    model, dataset = model or base.model, dataset or base.dataset
    for_model = [name for name, r in RECIPES.items() if r.model == model]
    on_dataset = [name for name in for_model if RECIPES[name].dataset == dataset]
    return (on_dataset or ([fallback] if fallback in for_model else for_model) or [GENERIC])[0]


def scaled_learning_rate(recipe: Recipe, batch_size: int) -> float:
    """The recipe's learning rate at global batch `batch_size`, by the linear scaling rule."""
    return recipe.learning_rate * batch_size / recipe.batch_size


def example_arguments(argv: list[str], fallback: str, prog: str) -> tuple[list[str], str]:
    """`(argv, default_recipe)` for an example script's `esam_hf.run.main`: the recipe `example_recipe`
    picks for the command line's `--model_name` and `--dataset`, and for `generic` a `--learning_rate`
    scaled to the command line's batch (unless it sets one), said on stderr."""
    if _option(argv, "recipe") or (len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))):
        return argv, fallback  # a recipe, or an argument file: run.parse decides
    recipe = example_recipe(_option(argv, "dataset"), _option(argv, "model_name"), fallback)
    if recipe == GENERIC and _option(argv, "learning_rate") is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        per_device = int(_option(argv, "per_device_train_batch_size") or max(1, RECIPES[GENERIC].batch_size // world_size))
        batch = per_device * int(_option(argv, "gradient_accumulation_steps") or 1) * world_size
        learning_rate = scaled_learning_rate(RECIPES[GENERIC], batch)
        argv = [*argv, "--learning_rate", f"{learning_rate:g}"]
        print(f"{prog}: no recipe has --model_name {_option(argv, 'model_name')}: the 'generic' recipe, at learning rate "
              f"{learning_rate:g} for the global batch of {batch} ({GENERIC_LR_PER_256:g} per 256 images).",
              file=sys.stderr)
    return argv, recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


@dataclass
class RecipeArguments:
    """`--recipe` and `--optimizer`: defaults for every other option, which still override them."""

    _argument_group_name = "recipe"

    recipe: str | None = field(default=None, metadata={
        "help": f"Start from a recipe of the paper's table: {', '.join(RECIPES)} (`esam-hf recipes` shows them).",
        "choices": list(RECIPES)})
    optimizer: str | None = field(default=None, metadata={
        "help": "Train as the plain SGD baseline (sets esam_rho 0), SAM (esam_beta = esam_gamma = 1) or ESAM "
                "(the recipe's rho, beta, gamma); with or without --recipe. Default: esam.",
        "choices": list(OPTIMIZERS)})


def recipe_defaults(name: str | None, optimizer: str | None) -> dict[str, Any]:
    """Option defaults for recipe `name` (None: none) trained with `optimizer` (None: esam)."""
    optimizer = optimizer or "esam"
    if name is None:
        return dict(OPTIMIZER_ESAM_ARGS[optimizer])
    recipe = get_recipe(name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    named = {k: v for k, v in (("model_name", recipe.model), ("dataset", recipe.dataset)) if v != ANY}
    return {
        **named,  # none for `generic`: the command line's model and dataset
        "model_kwargs": json.dumps(recipe.model_kwargs) if recipe.model_kwargs else None,
        "output_dir": os.path.join("outputs", f"{name}-{optimizer}"),
        "optim": "sgd",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "save_total_limit": 2,
        "logging_steps": 50,
        "per_device_eval_batch_size": 256,
        **recipe.training_args(optimizer, world_size),
        **{k: v for k, v in recipe.options.items()
           if (optimizer == "esam" or not k.startswith("esam_")) and k != "warmup_fraction"},
        **(warmup_fraction(recipe.options["warmup_fraction"]) if "warmup_fraction" in recipe.options else {}),
    }


def warmup_fraction(fraction: float) -> dict[str, float]:
    """The TrainingArguments field that warms up over `fraction` of training in this transformers:
    releases from 5.2x read a float `warmup_steps` < 1 as a fraction and dropped `warmup_ratio`;
    earlier releases have `warmup_ratio`."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"warmup_ratio": fraction} if "warmup_ratio" in fields else {"warmup_steps": fraction}


def optimizer_conflicts(optimizer: str | None, values: dict[str, Any], explicit: set[str]) -> list[str]:
    """Options given on the command line that contradict `--optimizer` (which would mislabel the run)."""
    implied = OPTIMIZER_ESAM_ARGS[optimizer or "esam"]
    return [f"--{name} {values[name]:g}" for name in sorted(explicit & set(implied)) if values[name] != implied[name]]


def main(argv: list[str] | None = None) -> None:
    """`esam-hf recipes`: the table, one row per recipe, and each recipe's note."""
    import argparse

    argparse.ArgumentParser(prog="esam-hf recipes", description="List the paper's recipes (use one with "
                            "`esam-hf train --recipe NAME`).", allow_abbrev=False).parse_args(argv)
    print("| recipe | dataset | model | epochs | batch | lr | wd | SAM rho | ESAM rho | beta | gamma | ESAM selection |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in RECIPES.items():
        esam = recipe_defaults(name, "esam")
        print(f"| {name} | {r.dataset} | {r.model} | {r.epochs} | {r.batch_size} | {r.learning_rate} | "
              f"{r.weight_decay} | {r.rho} | {esam['esam_rho']} | {r.beta} | {r.gamma} | "
              f"{esam.get('esam_selection', 'ascent')} |")
    notes = [(name, r.note) for name, r in RECIPES.items() if r.note]
    if notes:
        print()
        for name, note in notes:
            print(f"- {name}: {note}")
