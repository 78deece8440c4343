"""Top-1 and top-k classification accuracy, as an `evaluate` metric loaded by path (offline).

    metric = evaluate.load("<site-packages>/esam_hf/metrics/accuracy")
    metric.compute(predictions=logits, references=labels)            # accuracy, top5_accuracy
    metric.compute(predictions=logits, references=labels, top_k=[1])  # accuracy only
    metric.compute(predictions=label_ids, references=labels)         # accuracy only

This file is self-contained (evaluate copies it into its module cache before importing it), so it
imports nothing from esam_hf.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Fraction of examples whose reference label is among the k highest-scoring classes (top-k
accuracy); top-1 is the usual accuracy. Ties are broken towards the lower class index, as
numpy's argmax does, so top-1 from logits equals accuracy of `logits.argmax(-1)`. An example
whose scores are not all finite (NaN or infinite) is never counted as correct.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: either logits/scores of shape (N, C) (any monotone score works: logits,
        probabilities, log-probabilities), or predicted label ids of shape (N,).
    references: reference label ids of shape (N,).
    top_k: the k values to report (default (1, 5) for scores, (1,) for label ids). k larger than
        the number of classes counts every example as correct.
Returns:
    "accuracy" for k = 1 and "top{k}_accuracy" for other k, as floats in [0, 1].
Examples:
    >>> metric = evaluate.load("esam_hf/metrics/accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=[1])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Scores first: top-k needs them. Label ids are accepted for plain top-1 accuracy.
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, top_k=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references, dtype=np.int64)
        if predictions.ndim == 1:
            return _label_accuracy(predictions, references, top_k)
        return _topk_accuracy(predictions, references, (1, 5) if top_k is None else top_k)


def _label_accuracy(predictions, references, top_k):
    if top_k is not None and any(int(k) != 1 for k in top_k):
        raise ValueError("top-k accuracy with k > 1 needs scores of shape (N, C), not label ids")
    return {"accuracy": float(np.mean(predictions == references)) if len(references) else 0.0}


def _topk_accuracy(scores, references, top_k):
    if len(references) == 0:
        return {_key(k): 0.0 for k in top_k}
    # A row with a NaN or infinite score is a broken prediction, never a correct one (NaN compares
    # False with everything, so the rank below would otherwise put the label first).
    finite = np.isfinite(scores).all(axis=1)
    target = np.take_along_axis(scores, references[:, None], axis=1)
    # Rank of the reference class in a stable descending sort: classes scoring higher, plus
    # classes scoring the same with a lower index.
    lower_index = np.arange(scores.shape[1])[None, :] < references[:, None]
    rank = (scores > target).sum(axis=1) + ((scores == target) & lower_index).sum(axis=1)
    return {_key(k): float(np.mean(finite & (rank < int(k)))) for k in top_k}


def _key(k):
    return "accuracy" if int(k) == 1 else f"top{int(k)}_accuracy"
