"""ESAM (Efficient Sharpness-Aware Minimization) for the Hugging Face stack."""

from .esam import ESAM
from .losses import per_example_loss
from . import models  # registers the paper's CIFAR backbones with timm
from .trainer import ESAMTrainer, ESAMTrainingArguments

__version__ = "0.1.0"

__all__ = ["ESAM", "ESAMTrainer", "ESAMTrainingArguments", "per_example_loss", "__version__"]
