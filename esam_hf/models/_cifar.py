"""Pieces shared by the CIFAR backbones: default cfg, weight init, classifier head, builder.

The backbones follow timm's model protocol (``forward_features`` / ``forward_head`` /
``reset_classifier`` / ``get_classifier`` / ``pretrained_cfg``) so that ``timm.create_model`` and
``transformers.TimmWrapperForImageClassification`` can drive them like any built-in timm model.
"""

from typing import Any, Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CifarNet", "cifar_cfg", "create_cifar_model", "init_weights"]

# Per-channel statistics of the CIFAR-10 training set (the values used by the paper's code).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    """timm pretrained cfg for a 32x32 CIFAR model.

    There are no released weights (``url`` is empty); the cfg still matters because timm and
    ``TimmWrapperImageProcessor`` derive the eval transform from it. crop_pct 1.0 + 32 px means the
    eval transform is resize(32) -> center-crop(32) -> normalize, i.e. a no-op resize on CIFAR.
    """
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


def init_weights(module: nn.Module) -> None:
    """timm's ResNet init: kaiming-normal (fan_out) convs, BN gamma 1 / beta 0, zero linear bias.

    fan_out kaiming is also what the reference CIFAR ResNet / WRN / PyramidNet code uses
    (normal(0, sqrt(2 / (k*k*out_channels)))). Linear weights keep PyTorch's default uniform init.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CifarNet(nn.Module):
    """Base class: stem + ``stages`` + global-pool/dropout/fc head, with timm's head API.

    Subclasses build ``self.stages`` (an ``nn.Sequential`` of stages) and implement
    ``forward_stem`` and ``forward_final`` (anything between the last stage and the pool), then call
    ``self._init_head`` and ``self._init_weights``.
    """

    stages: nn.Sequential

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        # create_classifier gives timm's SelectAdaptivePool2d (flattening) + Linear, or Identity
        # when num_classes == 0 (what TimmWrapperModel asks for to get pooled features).
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)

    def _init_weights(self, zero_init_last: bool) -> None:
        self.apply(init_weights)
        if zero_init_last:
            # Residual branches start at zero so every block begins as identity (Goyal et al. 2017).
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()

    # --- timm head API -----------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        pool_type = global_pool if global_pool is not None else self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Used by transformers' gradient_checkpointing_enable() through TimmWrapper.
        self.grad_checkpointing = enable

    # --- forward -----------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.forward_final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_cifar_model(
    model_cls: Type[nn.Module], variant: str, pretrained: bool = False, feature_levels: int = 4, **kwargs: Any
) -> nn.Module:
    """Build through timm's builder so pretrained_cfg, in_chans / num_classes defaults and
    ``features_only`` behave exactly as for built-in models.

    ``feature_levels`` is the length of the model's ``feature_info`` (the default ``out_indices``
    of ``features_only=True``).
    """
    if pretrained:
        # timm would only log a warning and return random weights; failing loudly is safer for
        # experiments that believe they fine-tune from a checkpoint.
        raise ValueError(
            f"No pretrained weights exist for '{variant}': it is trained from scratch on CIFAR. "
            "Use pretrained=False."
        )
    # Stages live in the `stages` Sequential, so features_only must flatten it to reach them.
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(feature_levels)))
    return build_model_with_cfg(model_cls, variant, pretrained=False, feature_cfg=feature_cfg, **kwargs)
