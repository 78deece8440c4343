"""Per-example losses: SDS ranks examples, so the trainer needs one loss per example,
not the mean loss a Hugging Face model returns."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    shift_labels: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy per example, shape [B].

    - logits [B, C], labels [B]: image or sequence classification.
    - logits [B, T, V], labels [B, T]: token-level models; tokens labelled `ignore_index`
      are skipped and each sequence gets the mean over its own tokens. `shift_labels`
      predicts token t + 1 from position t, as causal language models do.
    """
    if logits.dim() == 2 and labels.dim() == 1 and labels.shape[0] == logits.shape[0]:
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if logits.dim() == 3 and labels.shape == logits.shape[:2]:
        if shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        token_losses = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="none",
            ignore_index=ignore_index, label_smoothing=label_smoothing,
        ).view(labels.shape)
        num_tokens = (labels != ignore_index).sum(dim=1).clamp_min(1)
        return token_losses.sum(dim=1) / num_tokens
    raise ValueError(
        "per_example_loss supports logits [B, C] with labels [B] (classification) and logits "
        f"[B, T, V] with labels [B, T] (token-level); got logits {tuple(logits.shape)} and labels "
        f"{tuple(labels.shape)}. Pass `per_example_loss_func=` to ESAMTrainer for other outputs."
    )
