import io
import datasets
import numpy as np
import PIL.Image
import torch
import torchvision.transforms as T

from esam_hf.data import collate_images, image_transform, load_splits, resolve_dataset, timm_data_config, with_image_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_data_config_from_pretrained_cfg_round_trips():
    cfg = {"input_size": (3, 160, 160), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
           "crop_pct": 0.9, "interpolation": "bilinear", "num_classes": 1000, "hf_hub_id": "x"}
    resolved = timm_data_config(cfg)
    assert resolved == {"input_size": (3, 160, 160), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                        "std": (0.25, 0.25, 0.25), "crop_pct": 0.9, "crop_mode": "center"}
    assert timm_data_config(resolved) == resolved
    default = timm_data_config()
    assert default["input_size"] == (3, 224, 224) and default["mean"] == IMAGENET_MEAN and default["crop_pct"] == 0.875


def test_every_imagenet_photo_becomes_a_3x224x224_tensor(imagenet_dir):
    spec = resolve_dataset(str(imagenet_dir), train_split="validation")
    raw, _, _ = load_splits(spec)
    modes = [img.mode for img in raw["image"][:]]
    assert modes.count("L") == 23  # the greyscale photos are really there

    config = timm_data_config()
    ds = with_image_transform(raw, "image", "label", image_transform(config, is_training=False))
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (64, 3, 224, 224) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == raw["label"][:]

    # Independent reference for the eval transform: resize the short side to 224 / 0.875 = 256, centre-crop 224.
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for i in (modes.index("L"), modes.index("RGB")):
        expected = reference(raw[i]["image"].convert("RGB"))
        torch.testing.assert_close(batch["pixel_values"][i], expected, atol=1e-5, rtol=0)
    grey = batch["pixel_values"][modes.index("L")] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(grey[0], grey[1], atol=1e-5, rtol=0)


def test_train_transform_is_random_resized_crop_and_flip_only():
    config = timm_data_config({"input_size": (3, 64, 64)})
    names = [type(t).__name__ for t in image_transform(config, is_training=True).transforms]
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"]
    # A flat grey image stays flat grey whatever the crop: no colour jitter.
    image = PIL.Image.new("RGB", (100, 80), (120, 120, 120))
    out = image_transform(config, is_training=True)(image)
    assert out.shape == (3, 64, 64)
    expected = torch.tensor([(120 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(out.mean((1, 2)), expected, atol=1e-4, rtol=0)


def test_transparent_16bit_and_float_images_train_on_the_pixels_the_pipeline_sees():
    from transformers import TimmWrapperImageProcessor
    from transformers.image_utils import load_image

    rgba = PIL.Image.new("RGBA", (40, 40), (0, 90, 200, 60))
    i16 = PIL.Image.fromarray(np.full((40, 40), 30000, dtype=np.uint16))
    floats = PIL.Image.fromarray(np.full((40, 40), 0.25, dtype=np.float32))
    images = [rgba, i16, floats]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0]}).cast_column("image", datasets.Image())
    config = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2), "crop_pct": 1.0,
              "interpolation": "bilinear", "crop_mode": "center"}
    out = with_image_transform(ds, "image", "label", image_transform(config, is_training=False))
    # Independent reference: what `pipeline("image-classification")` does to a file: load_image, then the
    # saved model's image processor.
    processor = TimmWrapperImageProcessor(pretrained_cfg=config, architecture="resnet18")
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="TIFF" if image.mode in ("I;16", "F") else "PNG")
        expected = processor(load_image(PIL.Image.open(io.BytesIO(buf.getvalue()))), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(out[i]["pixel_values"], expected, atol=1e-5, rtol=0)
