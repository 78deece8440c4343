"""ESAM (Efficient Sharpness-Aware Minimization) for the Hugging Face stack.

`from esam_hf import ESAM` imports torch only. The Hugging Face layers load on first use:
`ESAMTrainer`, `ESAMTrainingArguments` (transformers) and `models` (timm; importing it registers
the paper's CIFAR backbones with timm, which a saved CIFAR model needs before it reloads).
"""

import importlib

from .esam import ESAM
from .losses import per_example_loss

__version__ = "0.1.0"

_LAZY = {"ESAMTrainer": "trainer", "ESAMTrainingArguments": "trainer", "ESAMSeq2SeqTrainer": "trainer",
         "ESAMSeq2SeqTrainingArguments": "trainer", "models": "models"}

__all__ = ["ESAM", "ESAMTrainer", "ESAMTrainingArguments", "ESAMSeq2SeqTrainer", "ESAMSeq2SeqTrainingArguments",
           "models", "per_example_loss", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return module if name == "models" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
