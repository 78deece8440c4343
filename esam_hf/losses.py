"""Per-example losses: SDS ranks the examples of a batch, so it needs one loss per example, not the
mean a Hugging Face model returns. They only rank; what is trained is always the Trainer's loss.

Which loss a model trains is read from what the model declares, not from its wrapper's class name:
transformers' `loss_type` (the key of `transformers.loss.loss_utils.LOSS_MAPPING`, also found on a
subclass's bases), `config.is_encoder_decoder` and `config.problem_type`, after unwrapping DDP,
`torch.compile` and PEFT.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F

# transformers' loss types -> the head whose per-example loss ranks examples.
_HEADS_BY_LOSS_TYPE = {
    "ForCausalLM": "causal_lm",
    "ForConditionalGeneration": "causal_lm",  # seq2seq_lm when config.is_encoder_decoder
    "ForMaskedLM": "masked_lm",
    "ForTokenClassification": "token_classification",
    "ForSequenceClassification": "classification",
    "ForImageClassification": "classification",
    "ForVideoClassification": "classification",
    "ForAudioClassification": "classification",
}
_LOSS_TYPE = re.compile("|".join(_HEADS_BY_LOSS_TYPE))
HEADS = ("classification", "token_classification", "masked_lm", "causal_lm", "seq2seq_lm")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / DataParallel, `torch.compile` and PEFT wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            inner = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = model.module
        elif callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
            inner = model.get_base_model()
        else:
            return model
        if inner is model:
            return model
        model = inner


def model_head(model: torch.nn.Module) -> str | None:
    """The head a model's own loss trains (one of HEADS), or None if it declares none we know.

    A transformers model names its loss in `loss_type` (a subclass named otherwise finds it on its
    bases); a generative model without one uses transformers' default, the causal-LM loss. Plain
    modules may declare `config.problem_type`.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    loss_type = getattr(model, "loss_type", None) or next(
        (m.group(0) for cls in type(model).__mro__ if (m := _LOSS_TYPE.search(cls.__name__))), None)
    head = _HEADS_BY_LOSS_TYPE.get(loss_type)
    if head is None and loss_type is None and callable(getattr(model, "can_generate", None)) and model.can_generate():
        head = "causal_lm"
    if head == "causal_lm" and getattr(config, "is_encoder_decoder", False):
        head = "seq2seq_lm"  # decoder labels are aligned with the decoder's outputs: no shift
    if head is None and getattr(config, "problem_type", None) in PROBLEM_TYPES:
        head = "classification"
    return head


def output_loss(outputs: Any) -> Any:
    """The loss in a model's outputs, where `Trainer.compute_loss` reads it: `outputs["loss"]` of a dict or
    `ModelOutput`, else `outputs[0]` (a tuple, as `return_dict=False` gives); None when there is none."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    return getattr(outputs, "loss", None)


def output_logits(outputs: Any) -> torch.Tensor | None:
    """The logits in a model's outputs: `logits` of a dict or `ModelOutput`; of a tuple, the tensor after
    a one-element loss (`(loss, logits, ...)`, the order of transformers' `return_dict=False` outputs)."""
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    if isinstance(outputs, (tuple, list)):
        if (len(outputs) >= 2 and isinstance(outputs[0], torch.Tensor) and outputs[0].numel() == 1
                and isinstance(outputs[1], torch.Tensor)):
            return outputs[1]
        return None
    return getattr(outputs, "logits", None)


def infer_head(outputs: Any, inputs: Mapping) -> str | None:
    """"classification" when the outputs and batch can only mean a single-label classifier (float logits
    [B, C], from `logits` or a `(loss, logits)` tuple, and integer `labels` [B]); else None. A guess: the
    trainer confirms it on the first batch."""
    logits = output_logits(outputs)
    labels = inputs.get("labels")
    if (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor) and logits.dim() == 2
            and logits.is_floating_point() and labels.dim() == 1 and not labels.is_floating_point()
            and labels.shape[0] == logits.shape[0] and logits.shape[1] > 1):
        return "classification"
    return None


def label_counts(head: str, inputs: Mapping) -> torch.Tensor | None:
    """Labelled tokens per example [B] for token-level heads (what their per-example losses average over);
    None for classification heads, where every example weighs the same."""
    if head not in ("causal_lm", "seq2seq_lm", "masked_lm", "token_classification"):
        return None
    labels = inputs.get("shift_labels")
    if labels is None:
        labels = inputs["labels"][..., 1:] if head == "causal_lm" else inputs["labels"]
    return (labels != -100).sum(dim=-1)


def reduction_mismatch(head: str, scores: torch.Tensor, loss: torch.Tensor, inputs: Mapping, num_items_in_batch=None,
                       loss_scale: int = 1) -> str | None:
    """Whether the per-example losses `scores` of a `head` reduce to the loss a model returned (one host read):
    None when `loss` (divided by `loss_scale`, the Trainer's own scaling of it) is their mean over the
    micro-batch (per label token for token-level heads) or their sum over `num_items_in_batch`; else what
    they come to against that loss, as a parenthesis for an error or a warning."""
    weights = label_counts(head, inputs)
    total = scores.float().sum() if weights is None else (scores.float() * weights).sum()
    count = scores.new_tensor(scores.numel(), dtype=torch.float) if weights is None else weights.sum()
    candidates = [total / count.clamp_min(1)]
    if num_items_in_batch is not None:
        candidates.append(total / torch.as_tensor(num_items_in_batch, device=scores.device).float().clamp_min(1))
    candidates = torch.stack(candidates)
    got = loss.detach().float().reshape(()) / loss_scale
    if bool(torch.isclose(candidates, got, rtol=1e-3, atol=1e-5).any()):
        return None
    mean, *per_item = candidates.tolist()
    over_items = f", or {per_item[0]:.6g} over the Trainer's num_items_in_batch" if per_item else ""
    return (f" (the mean of its per-example {head} losses is {mean:.6g}{over_items}, but it returned "
            f"loss {float(got):.6g})")


def unknown_loss_message(model: torch.nn.Module, detail: str = "") -> str:
    """Why SDS refuses a model whose loss it cannot tell (`detail`: what showed it), and what to do."""
    name = type(unwrap_model(model)).__name__
    return (
        f"ESAMTrainer cannot tell which loss {name} trains{detail}, so SDS (esam_gamma < 1) cannot be "
        "shown to keep the objective: SDS descends on a subset of each batch, which is the same objective "
        "only when the loss is a mean of per-example losses (not for contrastive or in-batch-negative "
        "losses). esam_gamma=1 keeps the objective for any loss. If your loss is a mean over examples, pass "
        "per_example_loss_func=(outputs, labels) -> Tensor[B] to ESAMTrainer (SDS then ranks by it)."
    )


def problem_type(config: Any, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """`config.problem_type`, or what transformers' classification loss infers when it is unset."""
    declared = getattr(config, "problem_type", None)
    if declared in PROBLEM_TYPES:
        return declared
    if getattr(config, "num_labels", logits.shape[-1]) == 1:
        return "regression"
    return "single_label_classification" if not labels.is_floating_point() else "multi_label_classification"


def per_example_scores(head: str, outputs: Any, inputs: Mapping, config: Any = None,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-example losses [B] of a `head` (see `model_head`) from a model's outputs and its inputs."""
    logits = output_logits(outputs)
    labels = inputs.get("labels")
    if logits is None or labels is None:
        missing = "logits in the model's outputs" if logits is None else "`labels` in the batch"
        raise ValueError(f"per-example losses for SDS need {missing}; pass per_example_loss_func=(outputs, labels) "
                         "-> Tensor[B] to ESAMTrainer, or train with esam_selection='random' or esam_gamma=1.")
    logits = logits.detach()
    if logits.dtype in (torch.float16, torch.bfloat16):  # rank on float32 losses: half precision ties too often
        logits = logits.float()
    if head == "causal_lm":
        if inputs.get("shift_labels") is not None:  # collators that shift themselves (padding-free)
            return per_example_loss(logits, inputs["shift_labels"], label_smoothing)
        return per_example_loss(logits, labels, label_smoothing, shift_labels=True)
    if head in ("seq2seq_lm", "masked_lm", "token_classification"):
        return per_example_loss(logits, labels, label_smoothing)
    if head == "classification":
        kind = problem_type(config, logits, labels)
        if kind == "single_label_classification":
            return per_example_loss(logits, labels, label_smoothing)
        batch = logits.shape[0]
        if kind == "multi_label_classification":
            losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        else:
            losses = F.mse_loss(logits.reshape(batch, -1), labels.to(logits.dtype).reshape(batch, -1), reduction="none")
        return losses.reshape(batch, -1).mean(dim=1)
    raise ValueError(f"unknown head {head!r}; one of {HEADS}")


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
