"""The packaged top-1 / top-k accuracy metric, against an independent numpy computation."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from transformers import EvalPrediction

import esam_hf.metrics
from esam_hf.metrics import ACCURACY_PATH, compute_metrics_fn, load_accuracy


def reference_topk(logits, labels, k):
    """Independent reference: is the label among the first k classes of a stable descending sort?"""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean([label in row for row, label in zip(order, labels)]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=500)
    logits[np.arange(0, 500, 2), labels[::2]] += 3.0  # make top-1 well above chance
    return logits, labels


@pytest.fixture(scope="module")
def metric():
    return load_accuracy()


def test_metric_ships_inside_the_package():
    package_dir = Path(esam_hf.metrics.__file__).resolve().parent
    assert Path(ACCURACY_PATH) == package_dir / "accuracy"
    assert (package_dir / "accuracy" / "accuracy.py").is_file()


def test_logits_give_top1_and_top5(metric, data):
    logits, labels = data
    result = metric.compute(predictions=logits, references=labels)
    assert set(result) == {"accuracy", "top5_accuracy"}
    assert result["accuracy"] == pytest.approx(reference_topk(logits, labels, 1))
    assert result["top5_accuracy"] == pytest.approx(reference_topk(logits, labels, 5))
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert 0.3 < result["accuracy"] < result["top5_accuracy"] < 1.0


def test_label_ids_and_custom_k(metric, data):
    logits, labels = data
    assert metric.compute(predictions=logits.argmax(1), references=labels) == {
        "accuracy": pytest.approx(np.mean(logits.argmax(1) == labels))
    }
    result = metric.compute(predictions=logits, references=labels, top_k=[2, 3, 20])
    assert result == {
        "top2_accuracy": pytest.approx(reference_topk(logits, labels, 2)),
        "top3_accuracy": pytest.approx(reference_topk(logits, labels, 3)),
        "top20_accuracy": 1.0,  # k beyond the number of classes: always correct
    }
    with pytest.raises(ValueError, match="scores"):
        metric.compute(predictions=logits.argmax(1), references=labels, top_k=[5])


def test_ties_break_towards_lower_index_like_argmax(metric):
    logits = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 1, 2])
    # Every row's stable descending order is (0, 1, 2), as argmax's first-index rule implies:
    # top-1 is right for row 0 only, top-2 for rows 0 and 1.
    result = metric.compute(predictions=logits, references=labels, top_k=[1, 2])
    assert result == {"accuracy": pytest.approx(1 / 3), "top2_accuracy": pytest.approx(2 / 3)}


def test_compute_metrics_fn_with_trainer_outputs(data):
    logits, labels = data
    top1 = reference_topk(logits, labels, 1)
    top5 = reference_topk(logits, labels, 5)
    fn = compute_metrics_fn(top_k=(1, 5))
    # The Trainer passes a tuple when the model returns more than logits; logits come first.
    extra = np.zeros((len(labels), 4), dtype=np.float32)
    for eval_pred in (
        EvalPrediction(predictions=logits, label_ids=labels),
        EvalPrediction(predictions=(logits, extra), label_ids=labels),
        (logits, labels),
    ):
        assert fn(eval_pred) == {"accuracy": pytest.approx(top1), "top5_accuracy": pytest.approx(top5)}
    assert compute_metrics_fn()(EvalPrediction(predictions=logits, label_ids=labels)) == {
        "accuracy": pytest.approx(top1)
    }
    # preprocess_logits_for_metrics may already have reduced logits to label ids
    assert compute_metrics_fn()(EvalPrediction(predictions=logits.argmax(1), label_ids=labels)) == {
        "accuracy": pytest.approx(top1)
    }
    with pytest.raises(ValueError):
        compute_metrics_fn(top_k=(0,))


def test_loads_offline_in_a_fresh_process(tmp_path, data):
    """evaluate.load by path with the Hub off, an unreachable endpoint and an empty cache."""
    logits, labels = data
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "labels.npy", labels)
    code = textwrap.dedent(
        f"""
        import json, numpy as np, evaluate
        metric = evaluate.load({ACCURACY_PATH!r})
        logits, labels = np.load({str(tmp_path / "logits.npy")!r}), np.load({str(tmp_path / "labels.npy")!r})
        print(json.dumps(metric.compute(predictions=logits, references=labels)))
        """
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # any network attempt fails at once
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(reference_topk(logits, labels, 1))
    assert result["top5_accuracy"] == pytest.approx(reference_topk(logits, labels, 5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_never_correct(metric, bad):
    # A diverged model: every logit NaN (or inf) must score 0, not 100%.
    labels = np.array([0, 1, 2, 3])
    scores = np.full((4, 10), bad, dtype=np.float32)
    assert metric.compute(predictions=scores, references=labels, top_k=[1, 5]) == {"accuracy": 0.0, "top5_accuracy": 0.0}
    # One broken row among good ones costs exactly that row.
    good = np.eye(10, dtype=np.float32)[labels]
    good[2, 5] = bad
    result = compute_metrics_fn((1, 5))(EvalPrediction(predictions=good, label_ids=labels))
    assert result == {"accuracy": 0.75, "top5_accuracy": 0.75}
