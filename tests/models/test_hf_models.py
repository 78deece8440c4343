"""esam_hf.models.create_model: timm's weights, offline save/reload, processor and pipeline."""


import numpy as np
import pytest
import timm
import torch
import transformers
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
)

from esam_hf.models import CIFAR_MODELS, create_image_processor, create_model

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def assert_same_state(model_a, model_b):
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # parameters and buffers (BN running stats) alike
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A cifar_resnet18 with non-default kwargs, saved once for the reload tests."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet18", CIFAR10, drop_rate=0.1, zero_init_last=True).eval()
    with torch.no_grad():  # make BN running stats non-trivial so the reload test covers buffers
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("cifar_resnet18")
    model.save_pretrained(directory)
    create_image_processor(model).save_pretrained(directory)  # a no-op: config.json holds it
    return model, directory


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("cifar_resnet18", dict(zero_init_last=True)),  # zero BN gammas: HF init would set them to 1
        ("resnet18", {}),  # a built-in timm model (timm zero-inits its last BN gammas by default)
    ],
)
def test_weights_are_timms(name, kwargs):
    torch.manual_seed(123)
    model = create_model(name, CIFAR10, **kwargs)
    torch.manual_seed(123)
    reference = timm.create_model(name, num_classes=len(CIFAR10), **kwargs)
    assert isinstance(model, TimmWrapperForImageClassification)
    assert_same_state(model.timm_model, reference)
    zero_gammas = [m.weight for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(torch.all(w == 0) for w in zero_gammas)  # the case that HF's init would break


def test_plain_wrapper_would_reinitialise():
    # Why create_model exists: the stock constructor replaces timm's init (here: kaiming convs).
    config = TimmWrapperConfig(architecture="cifar_resnet18", num_labels=10)
    torch.manual_seed(123)
    stock = TimmWrapperForImageClassification(config)
    torch.manual_seed(123)
    reference = timm.create_model("cifar_resnet18", num_classes=10)
    assert not torch.equal(stock.timm_model.conv1.weight, reference.conv1.weight)


def test_config(saved):
    model, _ = saved
    config = model.config
    assert config.architecture == "cifar_resnet18"
    assert config.num_labels == 10
    assert config.id2label == dict(enumerate(CIFAR10))
    assert config.label2id == {name: i for i, name in enumerate(CIFAR10)}
    assert config.model_args == {"drop_rate": 0.1, "zero_init_last": True}
    cfg = config.pretrained_cfg
    assert cfg["input_size"] == [3, 32, 32]
    assert cfg["mean"] == [0.4914, 0.4822, 0.4465] and cfg["std"] == [0.2470, 0.2435, 0.2616]
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear" and cfg["num_classes"] == 10
    assert model.timm_model.drop_rate == 0.1


def test_save_and_reload_gives_identical_logits(saved):
    model, directory = saved
    reloaded = AutoModelForImageClassification.from_pretrained(directory)
    assert isinstance(reloaded, TimmWrapperForImageClassification)
    assert reloaded.config.id2label == dict(enumerate(CIFAR10))
    assert reloaded.timm_model.drop_rate == 0.1  # model_args replayed into timm.create_model
    assert_same_state(reloaded.timm_model, model.timm_model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


@pytest.fixture(scope="module")
def images(imagenet_dir):
    datasets = pytest.importorskip("datasets")
    split = datasets.load_dataset(str(imagenet_dir), split="validation")
    grey = next(i for i, mode in enumerate(img.mode for img in split["image"]) if mode == "L")
    return [split[0]["image"], split[grey]["image"]]  # one RGB, one greyscale photo


def test_processor_matches_timm_eval_transform(saved, images):
    model, directory = saved
    loaded = AutoImageProcessor.from_pretrained(directory)
    assert isinstance(loaded, TimmWrapperImageProcessor)
    # Independent reference: timm's own eval transform for a freshly created model.
    data_config = timm.data.resolve_data_config({}, model=timm.create_model("cifar_resnet18"))
    reference = timm.data.create_transform(**data_config, is_training=False)
    image = images[0].convert("RGB")
    expected = reference(image).unsqueeze(0)
    assert expected.shape == (1, 3, 32, 32)
    assert torch.equal(loaded(image)["pixel_values"], expected)
    assert torch.equal(create_image_processor(model)(image)["pixel_values"], expected)


def test_pipeline_agrees_with_in_memory_model(saved, images):
    model, directory = saved
    pipe = transformers.pipeline("image-classification", model=str(directory), device="cpu")
    processor = create_image_processor(model)
    for image in images:
        predictions = pipe(image, top_k=3)
        with torch.no_grad():
            logits = model.eval()(**processor(image.convert("RGB"))).logits[0]
        probabilities = logits.softmax(-1)
        top = torch.topk(probabilities, 3)
        assert [p["label"] for p in predictions] == [CIFAR10[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([p["score"] for p in predictions], top.values.numpy(), rtol=1e-5)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="cifar_resnet18"):
        create_model("cifar_resnet_18", CIFAR10)
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet_18", CIFAR10)
    assert set(CIFAR_MODELS) <= set(timm.list_models("cifar_*"))


def test_argument_errors():
    with pytest.raises(ValueError, match="No pretrained weights"):
        create_model("cifar_resnet18", CIFAR10, pretrained=True)
    with pytest.raises(TypeError, match="num_classes"):
        create_model("cifar_resnet18", CIFAR10, num_classes=10)
    with pytest.raises(ValueError, match="unique"):
        create_model("cifar_resnet18", ["a", "a"])
    with pytest.raises(ValueError, match="act_layer"):
        create_model("resnet18", CIFAR10, act_layer=torch.nn.ReLU)
