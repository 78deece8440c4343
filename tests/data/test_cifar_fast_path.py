import io

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.functional as TF

import esam_hf.data.cifar as cifar
from esam_hf.data import CifarAugment, CifarTensorDataset, DataError, cifar_data_config, cifar_tensors, collate_images

# Published statistics, typed in independently of the library.
C10_MEAN, C10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
C100_MEAN, C100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _noise_images(n, seed=0):
    # Values 1..255: the zero padding can never be mistaken for image content.
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _candidate_windows(image):
    """Every output torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip can give, normalised."""
    padded = TF.pad(image, [4])
    out = {}
    for top in range(9):
        for left in range(9):
            crop = TF.crop(padded, top, left, 32, 32)
            for flip in (False, True):
                window = TF.hflip(crop) if flip else crop
                out[top, left, flip] = TF.normalize(window.float() / 255, C10_MEAN, C10_STD)
    return out


def test_batched_crop_and_flip_match_torchvision_windows():
    images = _noise_images(200)
    augment = CifarAugment(C10_MEAN, C10_STD, cutout=False, generator=torch.Generator().manual_seed(0))
    batch = augment(images)
    assert batch.dtype == torch.float32 and batch.shape == (200, 3, 32, 32)

    seen = []
    for image, out in zip(images, batch):
        matches = [key for key, ref in _candidate_windows(image).items() if torch.allclose(out, ref, atol=1e-5)]
        assert len(matches) == 1, "every output must be exactly one padded-crop window, possibly mirrored"
        seen.append(matches[0])
    offsets = {(top, left) for top, left, _ in seen}
    flips = sum(flip for *_, flip in seen)
    assert len(offsets) > 60  # 81 possible offsets, 200 draws
    assert 70 < flips < 130


def test_crop_and_flip_switches():
    images = _noise_images(64)
    reference = TF.normalize(images.float() / 255, C10_MEAN, C10_STD)
    flip_only = CifarAugment(crop=False, cutout=False)(images)
    mirrored = [torch.allclose(o, TF.hflip(r), atol=1e-5) for o, r in zip(flip_only, reference)]
    kept = [torch.allclose(o, r, atol=1e-5) for o, r in zip(flip_only, reference)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)

    crop_only = CifarAugment(flip=False, cutout=False)(images)
    for image, out in zip(images, crop_only):
        windows = _candidate_windows(image)
        assert any(torch.allclose(out, ref, atol=1e-5) for (t, l, f), ref in windows.items() if not f)

    for augment in (CifarAugment(crop=False, flip=False, cutout=False), CifarAugment(train=False)):
        torch.testing.assert_close(augment(images), reference, atol=1e-5, rtol=0)


def test_cutout_zeroes_a_clipped_16x16_square_in_about_half_the_images():
    images = torch.full((2000, 3, 32, 32), 255, dtype=torch.uint8)  # normalised white is > 0 in every channel
    out = CifarAugment(crop=False, flip=False, generator=torch.Generator().manual_seed(0))(images)
    zero = out == 0
    assert (zero == zero[:, :1]).all(), "the same square in every channel"
    zero = zero[:, 0]
    cut = zero.flatten(1).any(1)
    assert 0.45 < cut.float().mean() < 0.55
    clipped = 0
    for mask in zero[cut]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        r0, r1, c0, c1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        assert mask.sum() == (r1 - r0) * (c1 - c0) and mask[r0:r1, c0:c1].all(), "an axis-aligned rectangle"
        for lo, hi in ((r0, r1), (c0, c1)):
            # Centred on a pixel inside the image: 16 long unless cut by a border, and at least 8 long.
            assert 8 <= hi - lo <= 16
            assert hi - lo == 16 or lo == 0 or hi == 32
        clipped += (r1 - r0, c1 - c0) != (16, 16)
    assert clipped > 0.3 * cut.sum()  # centres near a border are common (about 44% of them)
    # Pixels outside the square keep their normalised value; no cutout in eval mode.
    expected = torch.tensor([(1 - m) / s for m, s in zip(C10_MEAN, C10_STD)])
    torch.testing.assert_close(out[~cut][:, :, 0, 0], expected.expand(int((~cut).sum()), 3))
    assert not (CifarAugment(train=False)(images[:200]) == 0).any()


def test_normalisation_uses_the_published_statistics():
    values = torch.tensor([0, 128, 255], dtype=torch.uint8)
    images = values.view(3, 1, 1, 1).expand(3, 3, 32, 32).clone()
    for config, mean, std in ((cifar_data_config(10), C10_MEAN, C10_STD), (cifar_data_config(100), C100_MEAN, C100_STD)):
        out = CifarAugment(config["mean"], config["std"], train=False)(images)
        for v, image in zip(values.tolist(), out):
            expected = torch.tensor([(v / 255 - m) / s for m, s in zip(mean, std)])
            torch.testing.assert_close(image[:, 5, 7], expected, atol=1e-6, rtol=0)
        assert config["input_size"] == (3, 32, 32)


def test_real_cifar_is_centred_and_scaled_by_the_statistics(cifar_train_small, cache_dir):
    images, _ = cifar_tensors(cifar_train_small, "img", "label")
    out = CifarAugment(C10_MEAN, C10_STD, train=False)(images)
    # 200 images: the channel means sit within sampling error of 0, the stds near 1 (JPEG copy: ~1% lower).
    assert out.mean((0, 2, 3)).abs().max() < 0.12
    assert ((out.std((0, 2, 3)) - 1).abs() < 0.08).all()


def test_decoded_tensors_match_pil_and_cache_is_reused(cifar_train_small, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    images, labels = cifar_tensors(cifar_train_small, "img", "label", cache_dir=cache)
    assert images.dtype == torch.uint8 and images.shape == (200, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == cifar_train_small["label"][:]
    for i in (0, 57, 199):
        pil = np.asarray(cifar_train_small[i]["img"].convert("RGB"))
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), pil)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cifar, "_decode_images", no_decoding)
    again, again_labels = cifar_tensors(cifar_train_small, "img", "label", cache_dir=cache)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".pt"), files
    # Another subset is another cache entry.
    monkeypatch.undo()
    cifar_tensors(cifar_train_small.select(range(10)), "img", "label", cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 2 and not list(cache.glob("*.tmp"))


def test_interrupted_cache_write_leaves_nothing(cifar_train_small, tmp_path, monkeypatch):
    def failing_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        cifar_tensors(cifar_train_small.select(range(5)), "img", "label", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_and_corrupt_images_fail_with_the_row(tmp_path):
    import datasets

    def png(size):
        buf = io.BytesIO()
        PIL.Image.new("L", size, 3).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    ds = datasets.Dataset.from_dict({"img": [png((32, 32)), png((32, 32)), png((40, 32))], "label": [0, 1, 2]})
    ds = ds.cast_column("img", datasets.Image())
    with pytest.raises(DataError, match="image at row 2 is 40x32"):
        cifar_tensors(ds, "img", "label", cache_dir=tmp_path)
    images, _ = cifar_tensors(ds.select([0, 1]), "img", "label", cache_dir=tmp_path)
    assert (images == 3).all()  # greyscale became 3 equal channels

    broken = datasets.Dataset.from_dict({"img": [png((32, 32)), {"bytes": b"garbage", "path": "x.png"}], "label": [0, 1]})
    with pytest.raises(DataError, match=r"1 of the 2 images .*\n  row 1 \(path='x.png'\)"):
        cifar_tensors(broken.cast_column("img", datasets.Image()), "img", "label", cache_dir=tmp_path)


def test_generator_makes_augmentation_reproducible():
    images = _noise_images(32)

    def run(seed):
        return CifarAugment(generator=torch.Generator().manual_seed(seed))(images)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_dataloader_workers_draw_different_augmentations():
    # Every worker receives a copy of the dataset and its transform; with one shared generator state they
    # would all produce the same crops. Same image everywhere, so only the augmentation can differ.
    images = _noise_images(1).expand(64, 3, 32, 32).contiguous()
    augment = CifarAugment(generator=torch.Generator().manual_seed(0))
    dataset = CifarTensorDataset(images, torch.zeros(64, dtype=torch.int64), augment)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=2, collate_fn=collate_images)
    first, second = (b["pixel_values"] for b in loader)
    assert not torch.equal(first, second)


def _labelled(n, seed=0):
    return _noise_images(n, seed), torch.arange(n, dtype=torch.int64) % 10


def test_getitems_gives_the_finished_batch_with_the_transform_applied_once():
    images, labels = _labelled(40)
    calls = []

    class CountingAugment(CifarAugment):
        def __call__(self, batch):
            calls.append(batch.shape)
            return super().__call__(batch)

    dataset = CifarTensorDataset(images, labels, CountingAugment(generator=torch.Generator().manual_seed(0)))
    indices = [3, 17, 0, 39, 3]
    batch = dataset.__getitems__(indices)
    assert calls == [(5, 3, 32, 32)], "one call of the transform for the whole batch"
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [labels[i].item() for i in indices]
    assert collate_images(batch) is batch, "a finished batch passes through the collator unchanged"

    # Same generator state -> the same batch as augmenting the indexed images directly.
    expected = CifarAugment(generator=torch.Generator().manual_seed(0))(images[indices])
    torch.testing.assert_close(batch["pixel_values"], expected, atol=0, rtol=0)


def test_getitem_gives_a_single_example():
    images, labels = _labelled(8)
    dataset = CifarTensorDataset(images, labels, CifarAugment(C10_MEAN, C10_STD, train=False))
    item = dataset[5]
    assert set(item) == {"pixel_values", "labels"}
    assert item["pixel_values"].dtype == torch.float32 and item["pixel_values"].shape == (3, 32, 32)
    assert type(item["labels"]) is int and item["labels"] == 5
    torch.testing.assert_close(item["pixel_values"], TF.normalize(images[5].float() / 255, C10_MEAN, C10_STD),
                               atol=1e-5, rtol=0)
    assert dataset[-1]["labels"] == labels[-1].item()
    # Items indexed one by one still stack into the same batch layout.
    batch = collate_images([dataset[i] for i in range(8)])
    torch.testing.assert_close(batch["pixel_values"], dataset.__getitems__(list(range(8)))["pixel_values"])
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="8 images but 7 labels"):
        CifarTensorDataset(images, labels[:7], CifarAugment())


class _BatchOnly(CifarTensorDataset):
    """Fails if the DataLoader falls back to fetching items one by one (module level: picklable for workers)."""

    def __getitem__(self, i):
        raise AssertionError("the DataLoader should fetch whole batches through __getitems__")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_uses_getitems_for_whole_batches(num_workers):
    images, labels = _labelled(64, seed=3)
    dataset = _BatchOnly(images, labels, CifarAugment(generator=torch.Generator().manual_seed(0)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=num_workers, collate_fn=collate_images)
    batches = list(loader)
    assert len(batches) == 2
    for i, batch in enumerate(batches):
        assert set(batch) == {"pixel_values", "labels"}
        assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (32, 3, 32, 32)
        assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == labels[32 * i : 32 * (i + 1)].tolist()
    if num_workers == 0:
        # With the generator in the main process, the loader's batches are exactly what __getitems__ returns.
        replay = CifarTensorDataset(images, labels, CifarAugment(generator=torch.Generator().manual_seed(0)))
        for i, batch in enumerate(batches):
            expected = replay.__getitems__(list(range(32 * i, 32 * (i + 1))))
            torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
            assert torch.equal(batch["labels"], expected["labels"])
