import torch
import torch.nn.functional as F

from esam_hf.data import (
    CifarAugment,
    CifarTensorDataset,
    build_datasets,
    collate_images,
    measure_pipeline_throughput,
    resolve_dataset,
)


class TinyClassifier(torch.nn.Module):
    """Global average pool + linear: enough to run real Trainer steps in well under a second."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, pixel_values, labels=None):
        logits = self.fc(pixel_values.mean((2, 3)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


# Published CIFAR-10 statistics, typed in independently of the library.
C10_MEAN, C10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _train_and_evaluate(data, tmp_path):
    """Real Trainer steps with the bundle's one collator for both training and evaluation (no swapping)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=16, per_device_eval_batch_size=16,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", dataloader_num_workers=0,
    )
    trainer = Trainer(model=TinyClassifier(len(data.class_names)), args=args, train_dataset=data.train_dataset,
                      eval_dataset=data.eval_dataset, data_collator=data.collator)
    assert trainer.train().global_step == 2
    if data.eval_dataset is not None:
        assert "eval_loss" in trainer.evaluate()
        assert trainer.data_collator is data.collator
    return trainer


def _passes(dataset, collator, batch_size=16):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    return [torch.cat([b["pixel_values"] for b in loader]) for _ in range(2)]


def test_cifar_subset_end_to_end_with_trainer(tmp_path, cache_dir):
    data = build_datasets(resolve_dataset("cifar10-subset"), max_train_samples=64, max_eval_samples=32)
    assert isinstance(data.train_dataset, CifarTensorDataset) and len(data.train_dataset) == 64
    assert len(data.eval_dataset) == 32
    assert data.collator is collate_images
    assert isinstance(data.train_dataset.transform, CifarAugment) and data.train_dataset.transform.train
    assert isinstance(data.eval_dataset.transform, CifarAugment) and not data.eval_dataset.transform.train
    assert data.data_config["mean"] == (0.4914, 0.4822, 0.4465) and data.data_config["input_size"] == (3, 32, 32)
    assert data.class_names[0] == "airplane"
    item = data.train_dataset[0]
    assert item["pixel_values"].dtype == torch.float32 and item["pixel_values"].shape == (3, 32, 32)
    assert isinstance(item["labels"], int)
    trainer = _train_and_evaluate(data, tmp_path)
    assert len(list(cache_dir.glob("*.pt"))) == 2  # train and eval tensors cached

    # Evaluation is not augmented: through the same collator the Trainer trains with, eval batches are the
    # plain normalised images, identical on every pass; training batches are augmented afresh each pass.
    mean, std = torch.tensor(C10_MEAN).view(1, 3, 1, 1), torch.tensor(C10_STD).view(1, 3, 1, 1)
    reference = (data.eval_dataset.images.float() / 255 - mean) / std
    first, second = _passes(data.eval_dataset, data.collator)
    torch.testing.assert_close(first, reference, atol=1e-5, rtol=0)
    assert torch.equal(first, second)
    trainer_eval = torch.cat([b["pixel_values"] for b in trainer.get_eval_dataloader()])
    torch.testing.assert_close(trainer_eval, reference, atol=1e-5, rtol=0)
    train_first, train_second = _passes(data.train_dataset, data.collator)
    assert train_first.shape == (64, 3, 32, 32) and not torch.equal(train_first, train_second)


def test_flags_reach_the_train_transform_and_eval_only(cache_dir):
    spec = resolve_dataset("cifar10-subset")
    generator = torch.Generator().manual_seed(0)
    data = build_datasets(spec, max_train_samples=16, max_eval_samples=16, cutout=False, flip=False, generator=generator)
    augment = data.train_dataset.transform
    assert (augment.train, augment.cutout, augment.flip, augment.crop) == (True, False, False, True)
    assert augment.generator is generator
    assert not data.eval_dataset.transform.train

    data = build_datasets(spec, max_eval_samples=16, train=False)
    assert data.train_dataset is None and len(data.eval_dataset) == 16
    assert data.collator is collate_images and not data.eval_dataset.transform.train


def test_cifar_at_a_larger_input_size_uses_timm_transforms(cache_dir):
    data = build_datasets(resolve_dataset("cifar10-subset"), {"input_size": (3, 64, 64)}, max_train_samples=8,
                          max_eval_samples=8)
    assert data.collator is collate_images
    assert data.train_dataset[0]["pixel_values"].shape == (3, 64, 64)


def test_imagenet_sample_end_to_end_with_trainer(imagenet_dir, tmp_path):
    spec = resolve_dataset(str(imagenet_dir), train_split="validation")
    data = build_datasets(spec, {"input_size": (3, 64, 64)}, max_train_samples=32)
    assert data.eval_dataset is None and len(data.class_names) == 1000
    assert data.train_dataset[0]["pixel_values"].shape == (3, 64, 64)
    _train_and_evaluate(data, tmp_path)


def test_measure_pipeline_throughput_counts_images_over_time(cache_dir, monkeypatch):
    # Speed itself is measured by the benchmark, never asserted here: a fake clock that advances
    # one second per reading makes the expected rate exact (4 batches of 64 images per repeat).
    import esam_hf.data.pipeline as pipeline

    ticks = iter(range(10_000))
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: float(next(ticks)))
    data = build_datasets(resolve_dataset("cifar10-subset"), max_train_samples=512, max_eval_samples=16)
    rate = measure_pipeline_throughput(data.train_dataset, data.collator, batch_size=64, num_batches=4, repeats=2)
    assert rate == 256.0
