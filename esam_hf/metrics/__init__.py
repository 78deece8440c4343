"""Evaluation metrics that work offline.

The accuracy metric is an ``evaluate`` module shipped inside the package (``accuracy/accuracy.py``)
and loaded by path, so ``evaluate.load`` never goes to the Hub.
"""

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Tuple

import evaluate
import numpy as np

__all__ = ["ACCURACY_PATH", "compute_metrics_fn", "load_accuracy"]

# A folder: evaluate.load(folder) imports folder/<folder name>.py.
ACCURACY_PATH = str(Path(__file__).resolve().with_name("accuracy"))


def load_accuracy(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the packaged top-1 / top-k accuracy metric (kwargs go to evaluate.load)."""
    return evaluate.load(ACCURACY_PATH, **kwargs)


def compute_metrics_fn(top_k: Iterable[int] = (1,)) -> Callable[[Any], Dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer``: top-k accuracies from the eval logits.

    Returns ``{"accuracy": ...}`` for k = 1 and ``{"top{k}_accuracy": ...}`` for other k; the
    Trainer logs them as ``eval_accuracy``, ``eval_top5_accuracy``.
    """
    top_k = tuple(sorted({int(k) for k in top_k}))
    if not top_k or top_k[0] < 1:
        raise ValueError(f"top_k must be positive integers, got {top_k}")
    metric = load_accuracy()

    def compute_metrics(eval_pred: Any) -> Dict[str, float]:
        logits, labels = _logits_and_labels(eval_pred)
        # The Trainer has already gathered every process's predictions, so evaluate's Arrow
        # buffering adds nothing here but cost: it turns the N x C logits into Python lists
        # (~1.6 GB and ~15 s for ImageNet's 50k x 1000). Call the module's numpy code directly: evaluate
        # has no public call that skips that buffering, and `_compute` is the method its modules define.
        return metric._compute(predictions=logits, references=labels, top_k=top_k)

    return compute_metrics


def _logits_and_labels(eval_pred: Any) -> Tuple[np.ndarray, np.ndarray]:
    """(logits, labels) from an ``EvalPrediction`` or a ``(predictions, label_ids)`` pair.

    The Trainer gives a tuple of arrays when the model returns more than logits (e.g. hidden
    states); logits come first. It also gives a tuple of label arrays for several label names.
    """
    if hasattr(eval_pred, "predictions"):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        predictions, labels = eval_pred[0], eval_pred[1]
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    # Logits stay float32 (bf16/fp16 eval gives float32 after the Trainer's numpify); a 1-D
    # array (preprocess_logits_for_metrics returned argmax ids) stays integer.
    predictions = np.asarray(predictions)
    return predictions, np.asarray(labels, dtype=np.int64).reshape(-1)
