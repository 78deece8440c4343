"""Wide ResNet for CIFAR (Zagoruyko & Komodakis 2016), WRN-d-k with pre-activation blocks.

Layout of the authors' / xternalz's reference code: conv3x3 stem (16 ch), three groups of
n = (d - 4) / 6 pre-activation BasicBlocks with widths 16k, 32k, 64k (160/320/640 for k = 10),
a conv1x1 projection shortcut (on the pre-activated input) where the shape changes, then
BN-ReLU before the pool. WRN-28-10 has 36,479,194 parameters for 10 classes.
"""

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ._cifar import CifarNet, cifar_cfg, create_cifar_model

__all__ = ["CifarWideResNet", "PreActBasicBlock"]


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop_rate = drop_rate
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def zero_init_last(self) -> None:
        # Zero the last conv, not bn2: bn2 feeds a ReLU, and a zero gamma there would get zero
        # gradient (ReLU'(0) = 0) and never recover.
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        # As in the reference code, a projection shortcut sees the pre-activated input.
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.act2(self.bn2(self.conv1(pre)))
        if self.drop_rate:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class CifarWideResNet(CifarNet):
    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        zero_init_last: bool = False,
    ):
        """
        Args:
            depth: total depth d (6n + 4).
            widen_factor: width multiplier k.
            num_classes: classifier outputs; 0 gives a pooled-feature model (no fc).
            in_chans: input image channels.
            global_pool: timm pool type for the head.
            drop_rate: dropout before the classifier (timm's meaning of drop_rate).
            block_drop_rate: the WRN paper's dropout between the two convs of each block
                (0.3 in the WRN paper; 0 in the ESAM setup).
            zero_init_last: zero the last conv of every block (off: the paper's setup).
        """
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)

        stages, self.feature_info = [], [dict(num_chs=16, reduction=1, module="conv1")]
        in_chs, reduction = 16, 1
        for i, out_chs in enumerate(widths):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                PreActBasicBlock(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1, block_drop_rate)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{i}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        # Pre-activation nets end with the BN-ReLU that the last block did not apply; the last
        # feature level is taken after it.
        self.norm = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU(inplace=True)
        self.feature_info[-1]["module"] = "act"

        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        self._init_weights(zero_init_last)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))


default_cfgs = generate_default_cfgs({"cifar_wrn28_10": cifar_cfg(pool_size=(8, 8))})


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WideResNet-28-10 for CIFAR: 3 groups x 4 pre-activation blocks, widths 160/320/640."""
    model_args = dict(depth=28, widen_factor=10)
    return create_cifar_model(CifarWideResNet, "cifar_wrn28_10", pretrained, **dict(model_args, **kwargs))
