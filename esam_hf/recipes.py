"""The paper's training recipes (Du et al., 2022, Table 1 and the authors' scripts)."""

from __future__ import annotations

from dataclasses import dataclass, field

OPTIMIZERS = ("sgd", "sam", "esam")


@dataclass(frozen=True)
class Recipe:
    dataset: str
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

    def esam_args(self, optimizer: str = "esam") -> dict:
        """ESAMTrainingArguments fields for `optimizer`: the same recipe as plain SGD
        (rho = 0), SAM (beta = gamma = 1) or ESAM."""
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        rho = 0.0 if optimizer == "sgd" else self.rho
        beta, gamma = (1.0, 1.0) if optimizer != "esam" else (self.beta, self.gamma)
        return {"esam_rho": rho, "esam_beta": beta, "esam_gamma": gamma}

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

RECIPES: dict[str, Recipe] = {
    f"{dataset}-{short}": Recipe(dataset, *values)
    for dataset in ("cifar10", "cifar100")
    for short, values in _CIFAR.items()
}
_IMAGENET_NOTE = ("The authors never released their ImageNet recipe: this is the standard 90-epoch "
                  "SGD recipe (lr 0.1 per 256 images, weight decay 1e-4) with the CIFAR ESAM settings.")
RECIPES.update({
    "imagenet-resnet50": Recipe("imagenet", "resnet50", 90, 256, 0.1, 1e-4, 0.05, 0.6, 0.5, _IMAGENET_NOTE),
    "imagenet-resnet101": Recipe("imagenet", "resnet101", 90, 256, 0.1, 1e-4, 0.05, 0.6, 0.5, _IMAGENET_NOTE),
    # Not from the paper: the README's offline CPU demo on the CIFAR-10 subset shipped in the package.
    "demo": Recipe("cifar10-subset", "cifar_resnet18", 10, 64, 0.05, 5e-4, 0.05, 0.6, 0.5,
                   "CPU demo: a quarter-width ResNet-18 on the CIFAR-10 subset shipped in the package.",
                   model_kwargs={"channels": [16, 32, 64, 128]}),
})


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None
