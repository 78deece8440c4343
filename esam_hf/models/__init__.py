"""Models: the paper's CIFAR backbones (registered with timm on import) and the HF wrapper.

Importing this package registers ``cifar_resnet18``, ``cifar_wrn28_10`` and
``cifar_pyramidnet110`` with timm, so ``timm.create_model(name)`` and
``AutoModelForImageClassification.from_pretrained(dir)`` of a saved CIFAR model work.
"""

from .cifar_pyramidnet import CifarPyramidNet, cifar_pyramidnet110
from .cifar_resnet import CifarResNet, cifar_resnet18
from .cifar_wrn import CifarWideResNet, cifar_wrn28_10
from .hf import CIFAR_MODELS, create_image_processor, create_model

__all__ = [
    "CIFAR_MODELS",
    "CifarPyramidNet",
    "CifarResNet",
    "CifarWideResNet",
    "cifar_pyramidnet110",
    "cifar_resnet18",
    "cifar_wrn28_10",
    "create_image_processor",
    "create_model",
]
