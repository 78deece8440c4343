"""Model cards the Hub understands: metadata parsed back with huggingface_hub, the image card with its
model-index and image processor, and the Trainer's card plus an ESAM section for other models."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import (
    AutoImageProcessor,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TimmWrapperImageProcessor,
)

import esam_hf
from esam_hf import hub
from esam_hf.trainer import ESAMTrainer, ESAMTrainingArguments

IMAGE_TEXT = ("timm", "image-classification", 'pipeline("image-classification"', "backbone")


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16, learning_rate=0.05,
                  use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    return ESAMTrainingArguments(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny CIFAR ResNet trained 2 ESAM steps on cifar10-subset, in bf16 chosen the way `accelerate
    launch` chooses it (ACCELERATE_MIXED_PRECISION), not by --bf16."""
    from esam_hf.metrics import compute_metrics_fn
    from esam_hf.run import DataArguments, ModelArguments, build_model_and_data

    out = tmp_path_factory.mktemp("image") / "cifar-esam"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        args = _args(out, esam_rho=0.1, esam_beta=0.5, esam_gamma=0.5, esam_gamma_warmup=0.3, esam_selection="sharpness",
                     remove_unused_columns=False)
        _, model, data = build_model_and_data(ModelArguments("cifar_resnet18", model_kwargs='{"channels": [8, 16, 32, 64]}'),
                                              DataArguments("cifar10-subset", max_train_samples=64, max_eval_samples=40))
        trainer = ESAMTrainer(model=model, args=args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
                              data_collator=data.collator, compute_metrics=compute_metrics_fn((1, 5)))
        trainer.train()
        metrics = trainer.evaluate()
    trainer.save_model()
    return SimpleNamespace(trainer=trainer, data=data, metrics=metrics, out=out)


def test_image_card_metadata_model_index_and_body(image_run):
    trainer, out, metrics = image_run.trainer, image_run.out, image_run.metrics
    assert not trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    trainer.create_model_card(dataset="uoft-cs/cifar10", dataset_name="CIFAR-10", eval_split="test", eval_samples=40,
                              eval_split_size=10000, recipe="tiny-recipe", finetuned_from="timm/resnet18.a1_in1k")
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.base_model) == ("transformers", "image-classification", "timm/resnet18.a1_in1k")
    assert data.datasets == ["uoft-cs/cifar10"] and data.license is None  # a fine-tune: its base model's terms
    assert {"esam", "sam", "esam-hf", "timm", "image-classification"} <= set(data.tags)
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"accuracy", "top_5_accuracy"} and data.model_name == "cifar-esam"
    for metric, key in (("accuracy", "eval_accuracy"), ("top_5_accuracy", "eval_top5_accuracy")):
        r = results[metric]
        assert (r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) == ("image-classification", "uoft-cs/cifar10", "CIFAR-10", "test")
        assert r.metric_value == pytest.approx(metrics[key]) and "40 of 10000 test images" in r.metric_name
    text = card.text
    for needle in ["ESAM, rho = 0.1, beta = 0.5, gamma = 0.5, gamma warm-up 30%", "| 0.1 | 0.5 | 0.5 | False | clean | sharpness | 0.3 (linear) |",
                   "`cifar_resnet18` (timm), `channels=[8, 16, 32, 64]`; 0.18 M parameters",
                   "**40 of the 10000 images** of the `test` split: a subset",
                   "bf16 mixed precision (autocast, fp32 weights)", "tiny-recipe", "| optimizer |",
                   'pipeline("image-classification", model="./cifar-esam", trust_remote_code=True)',
                   "`./cifar-esam` is this card's folder", "# trust_remote_code=True: the model's code travels with it",
                   "du2022efficient"]:
        assert needle in text, needle
    for name in ("PyTorch", "Transformers", "timm", "Datasets"):
        assert f"- {name} " in text, name
    assert f"- esam_hf {esam_hf.__version__}" in text

    # An esam_hf alias of local data: no `datasets:` metadata, the path in the text; the full split is no subset.
    trainer.create_model_card(dataset="cifar10-subset", eval_split="test", eval_samples=40, eval_split_size=40)
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets is None and card.data.base_model is None and card.data.license == "apache-2.0"
    assert {r.dataset_name for r in card.data.eval_results} == {"cifar10-subset"}
    assert all("subset" not in (r.metric_name or "") for r in card.data.eval_results)
    assert "`cifar10-subset` (local data, not on the Hub)" in card.text and "a subset" not in card.text
    from esam_hf.data import CIFAR10_SUBSET_DIR

    assert str(CIFAR10_SUBSET_DIR) not in card.text and "/cifar10_subset" not in str(card.data)


def test_image_processor_reloads_as_the_eval_transform(image_run, tmp_path):
    out, data = image_run.out, image_run.data
    image_run.trainer.create_model_card(dataset="cifar10-subset")
    assert (out / "preprocessor_config.json").is_file()
    processor = AutoImageProcessor.from_pretrained(out)
    assert isinstance(processor, TimmWrapperImageProcessor)
    for key in ("mean", "std", "input_size"):
        assert tuple(processor.data_config[key]) == pytest.approx(tuple(data.data_config[key])), key
    # The file alone rebuilds the same processor (it carries pretrained_cfg, not only a pointer to config.json).
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "preprocessor_config.json", alone)
    from_file = TimmWrapperImageProcessor.from_pretrained(alone, image_processor_filename="preprocessor_config.json")
    assert from_file.data_config == processor.data_config
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "TimmWrapperImageProcessor" and saved["architecture"] == "cifar_resnet18"
    # Pixel for pixel, the processor gives what the evaluation dataset fed the model.
    eval_ds = data.eval_dataset
    for i in (0, 7):
        photo = Image.fromarray(eval_ds.images[i].permute(1, 2, 0).numpy())
        expected = eval_ds[i]["pixel_values"]
        assert torch.allclose(processor(photo)["pixel_values"][0], expected.reshape(3, 32, 32), atol=1e-5)
        assert torch.allclose(from_file(photo)["pixel_values"][0], expected.reshape(3, 32, 32), atol=1e-5)


def test_push_to_hub_passes_card_arguments_without_network(image_run, monkeypatch):
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"me/{repo_id}")

        def upload_folder(self, folder_path, **kwargs):
            calls["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
            calls["card"] = ModelCard.load(f"{folder_path}/README.md")
            return "committed"

    monkeypatch.setattr("transformers.trainer.hf_api", lambda: FakeApi())
    trainer = image_run.trainer
    monkeypatch.setattr(trainer, "hub_model_id", None)
    assert trainer.push_to_hub(dataset="uoft-cs/cifar10", eval_split="test", tags="demo") == "committed"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(calls["files"])
    card = calls["card"]
    assert card.data.datasets == ["uoft-cs/cifar10"] and "demo" in card.data.tags
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}


def _token_data(n, vocab, seq, labels=None):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [{"input_ids": ids[i], "labels": torch.tensor(i % labels) if labels else ids[i]} for i in range(n)]


def _accuracy(pred):
    return {"accuracy": float((np.asarray(pred.predictions).argmax(-1) == pred.label_ids).mean())}


def _assert_no_image_text(text):
    for needle in IMAGE_TEXT:
        assert needle not in text, needle


def test_text_classification_card_is_the_trainers_plus_esam(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, num_labels=3)
    data = _token_data(32, 40, 8, labels=3)
    trainer = ESAMTrainer(model=BertForSequenceClassification(config), args=_args(tmp_path / "bert", esam_selection="loss", esam_rho=0.05),
                          train_dataset=data, eval_dataset=data[:16], compute_metrics=_accuracy)
    trainer.train()
    trainer.evaluate()
    trainer.create_model_card(dataset="stanfordnlp/sst2", dataset_name="SST-2", eval_split="validation",
                              eval_samples=16, eval_split_size=872, language="en", tags="demo")
    path = tmp_path / "bert" / "README.md"
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "text-classification" and card.data.language == ["en"]
    assert card.data.datasets == ["stanfordnlp/sst2"]
    assert {"demo", "generated_from_trainer", "esam", "sam", "esam-hf"} <= set(card.data.tags)
    (result,) = card.data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split) == ("text-classification", "stanfordnlp/sst2", "validation")
    assert "16 of 872 validation examples" in result.metric_name
    text = path.read_text()
    _assert_no_image_text(text)
    assert "pypi.org" not in text  # esam-hf is on no package index: nothing to link
    for needle in ["## Sharpness-aware training (ESAM)", "ESAM, rho = 0.05, beta = 0.6, gamma = 0.5, loss selection",
                   "trained from scratch on the SST-2 dataset", "16 of the 872 examples of the `validation` split (a subset)",
                   "| precision | fp32 |", f"- esam_hf {esam_hf.__version__}", "- Transformers "]:
        assert needle in text, needle
    assert text.index("## Sharpness-aware training") < text.index("## Model description")


def test_causal_lm_card_labels_the_sgd_baseline(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    data = _token_data(16, 40, 8)
    trainer = ESAMTrainer(model=GPT2LMHeadModel(config), args=_args(tmp_path / "gpt2", esam_rho=0.0), train_dataset=data)
    trainer.train()
    trainer.create_model_card(dataset=str(tmp_path), dataset_name="my-corpus", recipe="lm")
    card = ModelCard.load(tmp_path / "gpt2" / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.datasets is None  # a local path: text only
    assert "esam" not in card.data.tags and "sam" not in card.data.tags and "esam-hf" in card.data.tags
    text = card.text
    _assert_no_image_text(text)
    assert "**SGD baseline (rho = 0)**" in text and "plain training with the base optimizer" in text
    assert f"local data `{tmp_path}`" in text and "| recipe | lm |" in text


@pytest.mark.parametrize("esam, label", [
    ({"esam_rho": 0.0, "esam_beta": 0.6, "esam_gamma": 0.5}, "SGD baseline (rho = 0)"),
    ({"esam_rho": 0.05, "esam_beta": 1.0, "esam_gamma": 1.0}, "SAM (rho = 0.05)"),
    ({"rho": 0.05, "beta": 1.0, "gamma": 1.0, "adaptive": True}, "ASAM (rho = 0.05)"),
    ({"rho": 0.05, "beta": 0.6, "gamma": 0.5}, "ESAM, rho = 0.05, beta = 0.6, gamma = 0.5"),
    ({"rho": 0.05, "beta": 0.6, "gamma": 0.5, "selection": "random", "gamma_warmup": 0.3},
     "ESAM, rho = 0.05, beta = 0.6, gamma = 0.5, random selection, gamma warm-up 30%"),
])
def test_method_label_is_what_the_run_trained(esam, label):
    assert hub.method_label(esam) == label


def test_hub_does_not_import_the_trainer():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(hub))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(getattr(n, "module", None) in ("trainer", "esam_hf.trainer") for n in top_level)
    assert "trainer import" not in inspect.getsource(hub)


def test_a_saved_cifar_model_loads_with_transformers_and_timm_alone(tmp_path):
    """A fresh process in which `esam_hf` cannot be imported loads the folder (the Hub way: its code
    travels with it, `trust_remote_code=True`), and its pipeline scores a real photo as the in-memory model."""
    import subprocess
    import sys

    from esam_hf.models import create_model, create_image_processor

    model = create_model("cifar_resnet18", ["cat", "dog", "ship"], channels=[8, 16, 32, 64]).eval()
    model.save_pretrained(tmp_path / "m")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "x.png")
    pixels = create_image_processor(model)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.softmax(model(pixels).logits, -1)[0]
    script = f"""
import json, sys
sys.modules["esam_hf"] = None  # not installed, as far as this process can tell
from transformers import pipeline
scores = pipeline("image-classification", model={str(tmp_path / "m")!r}, trust_remote_code=True)({str(tmp_path / "x.png")!r})
print(json.dumps({{s["label"]: s["score"] for s in scores}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is not supported for image-classification" not in done.stderr  # no error-level log for users
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    for i, name in enumerate(["cat", "dog", "ship"]):
        assert scores[name] == pytest.approx(float(expected[i]), abs=1e-5)


def test_a_transformers_image_classifier_card_carries_what_the_trainers_does(tmp_path):
    """A ViT trained as the transformers image example trains it (which passes tasks="image-classification"):
    the card has the Trainer's `datasets` and `model-index`, plus the ESAM section."""
    from transformers import Trainer, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 8, 8, generator=g), "labels": int(i % 3)} for i in range(16)]
    kwargs = {"finetuned_from": "google/vit-base-patch16-224-in21k", "tasks": "image-classification",
              "dataset": "beans", "dataset_tags": "beans", "tags": ["image-classification", "vision"]}
    cards = {}
    for name, cls in (("esam", ESAMTrainer), ("plain", Trainer)):
        trainer = cls(model=ViTForImageClassification(config), args=_args(tmp_path / name), train_dataset=data,
                      eval_dataset=data, compute_metrics=_accuracy)
        trainer.train()
        trainer.evaluate()
        trainer.create_model_card(**kwargs)
        cards[name] = ModelCard.load(tmp_path / name / "README.md")
    ours, theirs = cards["esam"].data, cards["plain"].data
    assert theirs.datasets and theirs.eval_results and ours.datasets == theirs.datasets
    assert ours.base_model == theirs.base_model
    assert [(r.task_type, r.dataset_type, r.metric_type) for r in ours.eval_results] == [
        (r.task_type, r.dataset_type, r.metric_type) for r in theirs.eval_results]
    text = cards["esam"].text
    assert "## Sharpness-aware training (ESAM)" in text and "pretrained_cfg" not in text


def test_a_pushed_cards_snippet_loads_the_hub_copy(image_run, monkeypatch):
    """Once the Trainer has a Hub repository (`push_to_hub`), the card's snippet names it instead of the folder."""
    monkeypatch.setattr(image_run.trainer, "hub_model_id", "me/cifar-esam", raising=False)
    image_run.trainer.create_model_card(dataset="cifar10-subset")
    text = (image_run.out / "README.md").read_text()
    assert 'pipeline("image-classification", model="me/cifar-esam", trust_remote_code=True)' in text
    assert "is this card's folder" not in text


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A run as `esam-hf train` trains it: 2 epochs of 4 steps, an evaluation and a checkpoint at each
    epoch's end, the per-epoch timeline, then the final evaluation, the saved folder and its card."""
    from esam_hf.run import TIMELINE, DataArguments, ModelArguments, TimelineCallback, train_image_classifier

    out = tmp_path_factory.mktemp("run") / "tiny"
    args = _args(out, max_steps=-1, num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch", optim="sgd")
    metrics = train_image_classifier(ModelArguments("cifar_resnet18", model_kwargs='{"channels": [8, 16, 32, 64]}'),
                                     DataArguments("cifar10-subset", max_train_samples=64, max_eval_samples=40), args,
                                     recipe="tiny", callbacks=[TimelineCallback(str(out / TIMELINE))])
    return SimpleNamespace(out=out, metrics=metrics, card=ModelCard.load(out / "README.md"))


def test_card_throughput_is_training_alone_as_in_the_tables(pipeline_run):
    out, text = pipeline_run.out, pipeline_run.card.text
    timeline = json.loads((out / "timeline.json").read_text())
    last = timeline["epochs"][-1]
    assert len(timeline["epochs"]) == 2 and timeline["train_samples"] == 64
    # By hand from the timeline: the images of every epoch over the seconds clocked from each epoch's start
    # to its end, which leave out the evaluations (the Trainer's own number counts them).
    per_second = 64 * last["epoch"] / last["train_seconds"]
    assert f"| throughput (examples/s, without evaluation) | {per_second:.4g} |" in text
    assert f"| training time (s, without evaluation) | {last['train_seconds']:.4g} |" in text
    whole_run = pipeline_run.metrics["train_samples_per_second"]
    assert whole_run < per_second and "whole run" not in text


def test_card_accuracies_are_percent_as_in_the_tables(pipeline_run):
    metrics, card = pipeline_run.metrics, pipeline_run.card
    assert f"| Top-1 accuracy, % (`eval_accuracy`) | {100 * metrics['eval_accuracy']:.2f} |" in card.text
    assert f"| Top-5 accuracy, % (`eval_top5_accuracy`) | {100 * metrics['eval_top5_accuracy']:.2f} |" in card.text
    # The model-index stays a fraction, as the Trainer's cards and the Hub's leaderboards have it.
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx(metrics["eval_accuracy"])


def test_every_checkpoint_loads_as_a_model_folder(pipeline_run):
    """Each checkpoint holds the image processor as the final folder does, so `AutoImageProcessor` and
    `pipeline` load it as they load the final model."""
    from transformers import AutoModelForImageClassification, pipeline

    out = pipeline_run.out
    final = json.loads((out / "preprocessor_config.json").read_text())
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-4", "checkpoint-8"]
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for checkpoint in checkpoints:
        assert json.loads((checkpoint / "preprocessor_config.json").read_text()) == final
        processor = AutoImageProcessor.from_pretrained(checkpoint)
        assert isinstance(processor, TimmWrapperImageProcessor) and type(processor) is TimmWrapperImageProcessor
        # esam_hf.models is imported here (the backbones registered with timm): no remote code needed.
        model = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            expected = torch.softmax(model(**processor(photo)).logits, -1)[0].max()
        scores = pipeline("image-classification", model=str(checkpoint))(photo)
        assert scores[0]["score"] == pytest.approx(float(expected), abs=1e-5)


def test_shipped_cards_link_no_package_index():
    """esam-hf is on no package index: the cards shipped with the benchmark results link none."""
    from pathlib import Path

    cards = list((Path(__file__).resolve().parents[1] / "benchmarks" / "results").rglob("README.md"))
    assert cards
    for card in cards:
        assert "pypi.org" not in card.read_text(), card
