"""The Hugging Face layer: ESAM's arguments in `TrainingArguments`, its step in `Trainer`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .esam import BN_STATS_MODES, ESAM, GAMMA_SCHEDULES, SELECTIONS, check_esam_args, scheduled_gamma
from .losses import per_example_loss

ESAM_STATE_NAME = "esam_state.pt"


@dataclass
class ESAMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus ESAM's hyper-parameters (the paper's defaults)."""

    esam_rho: float = field(default=0.05, metadata={"help": "Neighbourhood radius rho >= 0 (0 turns sharpness-awareness off)."})
    esam_beta: float = field(default=0.6, metadata={"help": "SWP: probability in (0, 1] that a parameter tensor is perturbed (1 = off)."})
    esam_gamma: float = field(default=0.5, metadata={"help": "SDS: fraction in (0, 1] of each batch used for the descent gradient (1 = off)."})
    esam_adaptive: bool = field(default=False, metadata={"help": "ASAM-style scale-invariant perturbation."})
    esam_bn_stats: str = field(
        default="clean",
        metadata={"help": "Update BatchNorm running statistics in the clean pass only ('clean') or in every pass ('all').",
                  "choices": list(BN_STATS_MODES)},
    )
    esam_gamma_warmup: float = field(
        default=0.0,
        metadata={"help": "Fraction of training in [0, 1] over which SDS moves from the whole batch to esam_gamma "
                          "(0 = off, the paper's ESAM). Keeps SDS from slowing early training on short schedules."},
    )
    esam_gamma_schedule: str = field(
        default="linear", metadata={"help": "Shape of the gamma warm-up.", "choices": list(GAMMA_SCHEDULES)}
    )
    esam_selection: str = field(
        default="sharpness",
        metadata={"help": "SDS score: 'sharpness' l(w+e) - l(w) (the paper's), 'loss' l(w+e), or 'random' "
                          "(a uniform subset: unbiased, and skips the selection forward pass).",
                  "choices": list(SELECTIONS)},
    )

    def __post_init__(self):
        check_esam_args(**esam_config(self, prefix=False), prefix="esam_")
        super().__post_init__()


_ESAM_DEFAULTS = {name: f.default for name, f in ESAMTrainingArguments.__dataclass_fields__.items() if name.startswith("esam_")}


def esam_config(args: TrainingArguments, prefix: bool = True) -> dict[str, Any]:
    """ESAM hyper-parameters of `args` (`esam_rho`, ...; `rho`, ... with prefix=False);
    plain `TrainingArguments` get the paper's defaults."""
    return {(name if prefix else name.removeprefix("esam_")): getattr(args, name, default)
            for name, default in _ESAM_DEFAULTS.items()}


class ESAMTrainer(Trainer):
    """`Trainer` whose `training_step` is an ESAM step (SAM with beta = gamma = 1).

    Args:
        per_example_loss_func: optional `(outputs, labels) -> Tensor[B]` for models whose
            outputs `esam_hf.per_example_loss` does not cover. Every other argument is
            `Trainer`'s.
    """

    def __init__(self, *args, per_example_loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.n_gpu > 1:
            raise ValueError(
                "ESAMTrainer supports one device (CPU or GPU) and multi-GPU DDP (`accelerate launch` or "
                "`torchrun`); DeepSpeed, FSDP and single-process DataParallel are not supported: ESAM "
                "perturbs and restores whole parameters between two backward passes."
            )
        check_esam_args(**esam_config(self.args, prefix=False), prefix="esam_")
        self.per_example_loss_func = per_example_loss_func
        self.esam: ESAM | None = None

    def _get_esam(self) -> ESAM:
        if self.esam is None:
            c = esam_config(self.args, prefix=False)
            self.esam = ESAM(self.model, rho=c["rho"], beta=c["beta"], gamma=c["gamma"], adaptive=c["adaptive"],
                             bn_stats=c["bn_stats"], selection=c["selection"], seed=self.args.seed)
        return self.esam

    def train(self, *args, **kwargs):
        self.esam = None  # `model_init` may build a new model
        return super().train(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        esam = self._get_esam()
        if esam.rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if "labels" not in inputs:
            raise ValueError(f"ESAMTrainer needs `labels` in every batch to compute per-example losses; got keys {sorted(inputs)}.")
        features = {k: v for k, v in inputs.items() if k != "labels"}
        accumulation_steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

        def loss_fn(batch):
            features, labels = batch
            with self.compute_loss_context_manager():
                outputs = model(**features)
            return self.compute_per_example_loss(model, outputs, labels)

        loss = esam.step(
            loss_fn,
            (features, inputs["labels"]),
            backward=lambda loss: self.accelerator.backward(loss / accumulation_steps),
            no_sync=lambda: self.accelerator.no_sync(model),
            grad_scaler=self.accelerator.scaler,
            gamma=self.current_gamma(),
        )
        return loss / accumulation_steps

    def current_gamma(self) -> float:
        """SDS fraction for this step: `esam_gamma`, or on its warm-up schedule. A function of
        the global step alone, so resumed runs and every DDP rank agree without extra state."""
        c = esam_config(self.args, prefix=False)
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 1.0
        return scheduled_gamma(c["gamma"], progress, c["gamma_warmup"], c["gamma_schedule"])

    def compute_per_example_loss(self, model: nn.Module, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """Loss of each example, shape [B]: `per_example_loss_func` if given, else cross-entropy
        on the logits with `label_smoothing_factor` (labels shifted for causal LMs)."""
        if self.per_example_loss_func is not None:
            return self.per_example_loss_func(outputs, labels)
        if isinstance(outputs, torch.Tensor):
            logits = outputs
        elif isinstance(outputs, dict) and "logits" in outputs:
            logits = outputs["logits"]
        elif isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
            logits = outputs[0]
        else:
            raise ValueError(
                f"Cannot find logits in the model's output of type {type(outputs).__name__}; pass "
                "`per_example_loss_func=(outputs, labels) -> Tensor[B]` to ESAMTrainer."
            )
        causal_lm = type(self.accelerator.unwrap_model(model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        return per_example_loss(logits, labels, self.args.label_smoothing_factor, shift_labels=causal_lm)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.esam is not None and "loss" in logs:
            logs.update(self.esam.pop_stats())
        super().log(logs, *args, **kwargs)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, recipe=None, **kwargs) -> None:
        """Write the ESAM model card (`model_cards/image_classification.md`, filled) as README.md
        in `output_dir`; `push_to_hub` calls this with its keyword arguments."""
        if not self.is_world_process_zero():
            return
        from .hub import write_model_card

        write_model_card(self, model_name=model_name, dataset=dataset or dataset_tags, recipe=recipe, license=license,
                         tags=[tags] if isinstance(tags, str) else tags)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self._get_esam().state_dict(), os.path.join(output_dir, ESAM_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, ESAM_STATE_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            self._get_esam().load_state_dict(torch.load(path, weights_only=True))
