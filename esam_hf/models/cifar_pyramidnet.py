"""PyramidNet for CIFAR (Han, Kim & Kim 2017, "Deep Pyramidal Residual Networks").

Additive widening: every block adds alpha / N channels (N = total blocks), rounded as in the
authors' code (dyhan0920/PyramidNet-PyTorch). Blocks are BN-conv3x3-BN-ReLU-conv3x3-BN with no
ReLU at the block end; shortcuts are parameter-free: 2x2 average pooling when the block
downsamples, and zero-padding of the extra channels. PyramidNet-110 (alpha 270, basic blocks,
n = 18 blocks per stage, 16 -> 286 channels) has 28,485,477 parameters for 10 classes.
"""

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ._cifar import CifarNet, cifar_cfg, create_cifar_model

__all__ = ["CifarPyramidNet", "PyramidBasicBlock"]


class PyramidBasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        # ceil_mode keeps odd feature maps aligned with the strided conv (as in the reference code).
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.extra_chs = out_chs - in_chs

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(out)))
        out = self.bn3(out)
        shortcut = self.downsample(x)
        if self.extra_chs:
            # Zero-padded identity: widening costs no shortcut parameters (pads trailing channels).
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_chs))
        return out + shortcut


class CifarPyramidNet(CifarNet):
    def __init__(
        self,
        depth: int = 110,
        alpha: float = 270,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
    ):
        """
        Args:
            depth: total depth (6n + 2 with basic blocks).
            alpha: total widening over the network (final width = 16 + alpha).
            num_classes: classifier outputs; 0 gives a pooled-feature model (no fc).
            in_chans: input image channels.
            global_pool: timm pool type for the head.
            drop_rate: dropout before the classifier (timm's meaning of drop_rate).
            zero_init_last: zero the last BN gamma of every block (off: the paper's setup).
        """
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"PyramidNet (basic blocks) depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        add_rate = alpha / (3 * n)
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)  # no ReLU after the stem BN in PyramidNet

        stages, self.feature_info = [], [dict(num_chs=16, reduction=1, module="bn1")]
        width, in_chs, reduction = 16.0, 16, 1
        for i in range(3):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                # Accumulate the float width and round per block, exactly like the reference code.
                width += add_rate
                out_chs = int(round(width))
                blocks.append(PyramidBasicBlock(in_chs, out_chs, stride if j == 0 else 1))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(in_chs)  # blocks end in BN without ReLU: finish with BN-ReLU
        self.act = nn.ReLU(inplace=True)
        self.feature_info[-1]["module"] = "act"

        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        self._init_weights(zero_init_last)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))


default_cfgs = generate_default_cfgs({"cifar_pyramidnet110": cifar_cfg(pool_size=(8, 8))})


@register_model
def cifar_pyramidnet110(pretrained: bool = False, **kwargs: Any) -> CifarPyramidNet:
    """PyramidNet-110 for CIFAR: alpha 270, basic blocks, additive widening 16 -> 286 channels."""
    model_args = dict(depth=110, alpha=270)
    return create_cifar_model(CifarPyramidNet, "cifar_pyramidnet110", pretrained, **dict(model_args, **kwargs))
