"""The CIFAR backbones against their published architecture definitions.

Parameter counts are recomputed here layer by layer from the papers' specifications (and agree
with the standard counts quoted for the reference implementations), independently of the model code.
"""

import math

import pytest
import timm
import torch

import esam_hf.models  # noqa: F401  (registers the CIFAR models with timm)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def conv(k, c_in, c_out):  # bias-free convs throughout, as in the reference code
    return k * k * c_in * c_out


def bn(c):
    return 2 * c


def linear(c_in, c_out):
    return c_in * c_out + c_out


def resnet18_params(num_classes):
    """He et al. ResNet-18, CIFAR variant: 3x3 stem (64), BasicBlocks [2,2,2,2], conv1x1+BN shortcuts."""
    total = conv(3, 3, 64) + bn(64)
    c_in = 64
    for c_out, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
        for block in range(2):
            total += conv(3, c_in, c_out) + bn(c_out) + conv(3, c_out, c_out) + bn(c_out)
            if block == 0 and (stride != 1 or c_in != c_out):
                total += conv(1, c_in, c_out) + bn(c_out)
            c_in = c_out
    return total + linear(512, num_classes)


def wrn_params(depth, k, num_classes):
    """Zagoruyko & Komodakis WRN-d-k: 16-ch stem, 3 groups of (d-4)/6 pre-act blocks, 1x1 shortcuts."""
    n = (depth - 4) // 6
    total = conv(3, 3, 16)
    c_in = 16
    for c_out in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(c_in) + conv(3, c_in, c_out) + bn(c_out) + conv(3, c_out, c_out)
            if c_in != c_out:
                total += conv(1, c_in, c_out)
            c_in = c_out
    return total + bn(c_in) + linear(c_in, num_classes)


def pyramidnet_widths(depth, alpha):
    """Han et al.: block k (1-based, N blocks in all) outputs round(16 + k * alpha / N) channels."""
    n_blocks = 3 * ((depth - 2) // 6)
    return [int(round(16 + k * alpha / n_blocks)) for k in range(1, n_blocks + 1)]


def pyramidnet_params(depth, alpha, num_classes):
    """Basic pyramidal blocks BN-conv-BN-ReLU-conv-BN, parameter-free (pool + zero-pad) shortcuts."""
    total = conv(3, 3, 16) + bn(16)
    c_in = 16
    for c_out in pyramidnet_widths(depth, alpha):
        total += bn(c_in) + conv(3, c_in, c_out) + bn(c_out) + conv(3, c_out, c_out) + bn(c_out)
        c_in = c_out
    return total + bn(c_in) + linear(c_in, num_classes)


# name, expected params for 10 classes, literature formula, final feature map (C, H, W)
SPECS = {
    "cifar_resnet18": (11_173_962, lambda nc: resnet18_params(nc), (512, 4, 4)),
    "cifar_wrn28_10": (36_479_194, lambda nc: wrn_params(28, 10, nc), (640, 8, 8)),
    "cifar_pyramidnet110": (28_485_477, lambda nc: pyramidnet_params(110, 270, nc), (286, 8, 8)),
}


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=10).eval() for name in SPECS}


def test_formulas_reproduce_the_standard_counts():
    # Guards the reference formulas themselves (kuangliu ResNet18, xternalz WRN-28-10, and the
    # "28.3M"-class PyramidNet-110 alpha=270 of Han et al., Table 4).
    assert resnet18_params(10) == 11_173_962
    assert wrn_params(28, 10, 10) == 36_479_194
    assert pyramidnet_params(110, 270, 10) == 28_485_477


@pytest.mark.parametrize("name", list(SPECS))
def test_parameter_count(models, name):
    expected, formula, _ = SPECS[name]
    assert num_params(models[name]) == expected == formula(10)


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_shapes(models, name):
    model = models[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # one pass through the trunk: WRN / PyramidNet are ~5 GFLOPs an image
        features = model.forward_features(x)
        logits = model.forward_head(features)
        pooled = model.forward_head(features, pre_logits=True)
    assert tuple(features.shape) == (2, *SPECS[name][2])
    assert tuple(logits.shape) == (2, 10)
    assert tuple(pooled.shape) == (2, model.num_features)


@pytest.mark.parametrize("name", list(SPECS))
def test_pretrained_cfg(models, name):
    cfg = models[name].pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == CIFAR10_MEAN and tuple(cfg["std"]) == CIFAR10_STD
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert cfg["num_classes"] == 10
    # first_conv / classifier must name real modules (timm uses them to adapt in_chans / heads).
    first_conv = models[name].get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, torch.nn.Conv2d) and first_conv.in_channels == 3
    assert models[name].get_submodule(cfg["classifier"]) is models[name].get_classifier()


def test_pyramidnet_widens_additively(models):
    convs = [m for n, m in models["cifar_pyramidnet110"].named_modules() if n.endswith("conv2")]
    assert [c.out_channels for c in convs] == pyramidnet_widths(110, 270) == [16 + 5 * k for k in range(1, 55)]


def test_num_classes_in_chans_and_head_api():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet18", num_classes=100, in_chans=1).eval()
    assert num_params(model) == resnet18_params(100) - conv(3, 2, 64)
    with torch.no_grad():
        assert tuple(model(torch.randn(3, 1, 32, 32)).shape) == (3, 100)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), torch.nn.Identity)
        assert tuple(model(torch.randn(3, 1, 32, 32)).shape) == (3, 512)
        model.reset_classifier(7)
        assert tuple(model(torch.randn(3, 1, 32, 32)).shape) == (3, 7)


def test_timm_style_init(models):
    model = models["cifar_resnet18"]
    conv_w = model.stages[3][1].conv2.weight  # 512x512x3x3
    expected_std = math.sqrt(2.0 / (3 * 3 * 512))  # kaiming normal, fan_out, ReLU gain
    assert conv_w.std().item() == pytest.approx(expected_std, rel=0.02)
    assert conv_w.mean().abs().item() < 0.1 * expected_std
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_zero_init_last_makes_blocks_identity():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet18", zero_init_last=True)
    assert all(torch.all(block.bn2.weight == 0) for stage in model.stages for block in stage)
    block = timm.create_model("cifar_pyramidnet110", zero_init_last=True).stages[0][1].eval()
    x = torch.randn(1, block.bn1.num_features, 8, 8)
    with torch.no_grad():
        out = block(x)
    # residual branch is zero, shortcut is the identity zero-padded by the widening (5 channels)
    assert torch.equal(out[:, : x.shape[1]], x) and torch.all(out[:, x.shape[1]:] == 0)


def test_pretrained_true_is_a_clear_error():
    with pytest.raises(ValueError, match="No pretrained weights"):
        timm.create_model("cifar_resnet18", pretrained=True)


def test_grad_checkpointing_and_features_only():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), expected, atol=1e-5)
    features = timm.create_model("cifar_resnet18", features_only=True).eval()
    with torch.no_grad():
        shapes = [tuple(f.shape[1:]) for f in features(x)]
    assert shapes == [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
