"""The saved CIFAR models' own code, so that a plain transformers + timm install loads them.

`save_pretrained` of a CIFAR model copies this file and the backbone files it imports into the model
folder and names the class in `config.json` (`auto_map`). Anyone can then load the folder, or its Hub
copy, without esam_hf:

    AutoModelForImageClassification.from_pretrained(folder_or_hub_id, trust_remote_code=True)
    pipeline("image-classification", model=folder_or_hub_id, trust_remote_code=True)

Importing this module registers the backbones with timm; the class itself is transformers' timm wrapper.
Only transformers, timm and torch are imported (relative imports are copied with it).
"""

from transformers import TimmWrapperForImageClassification as _TimmWrapperForImageClassification

from .cifar_pyramidnet import cifar_pyramidnet110  # noqa: F401  (registers the backbone with timm)
from .cifar_resnet import cifar_resnet18  # noqa: F401
from .cifar_wrn import cifar_wrn28_10  # noqa: F401


# Named as transformers' own class on purpose: `pipeline()` checks a model's class name against its task's
# list and logs an error ("is not supported for image-classification") for any other name, remote code included.
class TimmWrapperForImageClassification(_TimmWrapperForImageClassification):
    """transformers' `TimmWrapperForImageClassification`, loaded with the CIFAR backbones (ResNet-18,
    WideResNet-28-10, PyramidNet-110 for 32x32 images) registered, which stock timm does not know."""

    def save_pretrained(self, *args, **kwargs):
        # FSDP2's fully_shard gives the instance a subclass made on the fly, defined in torch: saved as it is,
        # config.json's auto_map and the copied code would be torch's FSDP files. Save as this class.
        own_class = type(self)
        self.__class__ = TimmWrapperForImageClassification
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = own_class


TimmWrapperForImageClassification.register_for_auto_class("AutoModelForImageClassification")
