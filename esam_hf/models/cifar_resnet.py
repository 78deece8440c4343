"""ResNet-18 for 32x32 inputs (He et al. 2016), in the widely used kuangliu/pytorch-cifar layout.

Differences from the ImageNet ResNet-18 (timm ``resnet18``): a 3x3 stride-1 stem conv and no
max-pool, so the 32x32 input is only downsampled 3x (to 4x4) inside the stages; the shortcut
projection is conv1x1 + BN whenever the shape changes. 11,173,962 parameters for 10 classes.
"""

from typing import Any, Sequence, Type

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._cifar import CifarNet, cifar_cfg, create_cifar_model

__all__ = ["CifarResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity or (conv1x1-BN) shortcut, then ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        self.act2 = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(CifarNet):
    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        channels: Sequence[int] = (64, 128, 256, 512),
        block: Type[nn.Module] = BasicBlock,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
    ):
        """
        Args:
            layers: blocks per stage.
            channels: output channels per stage (the stem has ``channels[0]``).
            num_classes: classifier outputs; 0 gives a pooled-feature model (no fc).
            in_chans: input image channels.
            global_pool: timm pool type for the head ('avg', 'max', 'avgmax', ...).
            drop_rate: dropout before the classifier (timm's meaning of drop_rate).
            zero_init_last: zero the last BN gamma of every block (off: the paper's setup).
        """
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)

        stages, self.feature_info = [], [dict(num_chs=channels[0], reduction=1, module="act1")]
        in_chs, reduction = channels[0], 1
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [block(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{i}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)

        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        self._init_weights(zero_init_last)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))


default_cfgs = generate_default_cfgs({"cifar_resnet18": cifar_cfg(pool_size=(4, 4))})


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for CIFAR: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2], widths 64-512."""
    model_args = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512))
    return create_cifar_model(CifarResNet, "cifar_resnet18", pretrained, feature_levels=5, **dict(model_args, **kwargs))
