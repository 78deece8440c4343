"""The Hugging Face layer: ESAM's arguments in `TrainingArguments`, its step in `Trainer`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments
from transformers.utils import logging

from .esam import BN_STATS_MODES, ESAM, GAMMA_SCHEDULES, SELECTIONS, check_esam_args, scheduled_gamma
from .losses import (infer_head, model_head, output_loss, per_example_scores, reduction_mismatch, unknown_loss_message,
                     unwrap_model)
from .nonfinite import NONFINITE_PATIENCE, NonFiniteGradientGuard, TrainingDiverged, weights_problem  # noqa: F401
from .trainer_checkpoint import (ESAM_STATE_NAME, load_esam_state, naming_damaged_checkpoint, naming_full_disk,
                                 save_esam_state)

# Warn when the SDS rows' top-class share exceeds the batch's by this much (a random half: ~0.05).
CONCENTRATION_WARNING = 0.25
# ... and only while the logged loss stays above this share of the first logged loss (a stall), judged no
# sooner than STALL_STEPS optimizer steps after that first logging step: on the README's plateau benchmark
# (`benchmarks/accuracy.py plateau`) the runs that learn reach 0.82x their first loss within 64 steps.
STALL_DROP = 0.9
STALL_STEPS = 100
logger = logging.get_logger(__name__)


@dataclass
class ESAMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus ESAM's hyper-parameters: the paper's beta and gamma, rho 0.03 (SAM's 0.05
    radius after SWP's 1/beta scaling) and SDS on the ascent (the perturbation from a random half of the
    batch, the descent on the whole batch). The paper's ESAM is `esam_rho=0.05, esam_selection="sharpness"`."""

    # 0.03 = SAM's customary 0.05 x beta: SWP scales the kept tensors' perturbation by 1/beta, so this
    # perturbs as far as SAM at 0.05 (the paper's ESAM uses 0.05: measured worse, README "Choosing a mode").
    esam_rho: float = field(default=0.03, metadata={"help": "Neighbourhood radius rho >= 0 (0 turns sharpness-awareness "
                                                            "off); the kept tensors move by rho / esam_beta."})
    esam_beta: float = field(default=0.6, metadata={"help": "SWP: probability in (0, 1] that a parameter tensor is perturbed (1 = off)."})
    esam_gamma: float = field(default=0.5, metadata={"help": "SDS: fraction in (0, 1] of each batch used for the ascent "
                                                              "(esam_selection 'ascent') or the descent gradient (1 = off)."})
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
        # Not the paper's: a descent on half of each batch under-fits wherever the number of steps limits the fit
        # (full-data runs); a perturbation aimed by half of it kept SAM's accuracy on both CPU benchmarks, at
        # 4.3 forward-equivalents a step against SAM's 6 (README, "Choosing a mode").
        default="ascent",
        metadata={"help": "Which examples SDS keeps: 'sharpness' l(w+e) - l(w) (the paper's), 'loss' l(w+e), 'random' "
                          "(a uniform subset: unbiased, and skips the selection forward pass), 'balanced' "
                          "(the sharpest share of each class in the batch; needs integer class labels), "
                          "'clean_loss' (the largest losses at w: no selection forward pass), or 'ascent' (SDS on "
                          "the other pass: the perturbation from a random esam_gamma of the batch, the descent on "
                          "the whole batch).",
                  "choices": list(SELECTIONS)},
    )

    def __post_init__(self):
        # Only ESAM's own fields are checked here: an evaluation-only script must be able to build
        # whatever TrainingArguments accepts (max_steps=0, ...); `ESAMTrainer.train()` refuses the rest.
        check_esam_args(**esam_config(self, prefix=False), prefix="esam_")
        super().__post_init__()


# transformers optimizers that update the weights inside the backward pass (per layer, as gradients
# arrive): in ESAM's descent that is at w + e, and the restore to w then erases the update.
IN_BACKWARD_OPTIMIZERS = ("layerwise", "lomo")


def check_training_args(args: TrainingArguments, allow_zero_epochs: bool = False) -> None:
    """Refuse TrainingArguments that would train nothing, train to NaN, or (at esam_rho > 0) have their
    update undone, without saying so. Called by `ESAMTrainer.train()` with `allow_zero_epochs=True`:
    `num_train_epochs=0` (and max_steps <= 0) then passes and trains nothing, as `Trainer.train()` does; a
    command line that asks to train refuses it (the default)."""
    for name in ("learning_rate", "weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            off = " (0 turns clipping off)" if name == "max_grad_norm" else ""
            raise ValueError(f"{name} must be a finite number >= 0{off}, got {value!r}")
    optim = str(getattr(args.optim, "value", args.optim))
    if esam_config(args)["esam_rho"] > 0 and any(name in optim for name in IN_BACKWARD_OPTIMIZERS):
        raise ValueError(
            f"optim={optim!r} updates the weights inside the backward pass, which ESAM runs at the perturbed weights "
            "w + e and then restores w, erasing the update: training would not move. Use an optimizer that steps "
            "after the backward (e.g. adamw_torch, sgd, galore_adamw without _layerwise), or esam_rho=0."
        )
    for name in ("gradient_accumulation_steps", "per_device_train_batch_size"):
        if not (isinstance(getattr(args, name), int) and getattr(args, name) >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(args, name)!r}")
    if allow_zero_epochs and args.max_steps <= 0 and args.num_train_epochs == 0:
        return
    if args.max_steps == 0:
        raise ValueError("max_steps must be > 0 (a number of optimizer steps) or -1 to train num_train_epochs, got 0")
    if args.max_steps < 0 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise ValueError(f"num_train_epochs must be a finite number > 0 (or set max_steps > 0), got {args.num_train_epochs!r}")


_ESAM_DEFAULTS = {name: f.default for name, f in ESAMTrainingArguments.__dataclass_fields__.items() if name.startswith("esam_")}


def esam_config(args: TrainingArguments, prefix: bool = True) -> dict[str, Any]:
    """ESAM hyper-parameters of `args` (`esam_rho`, ...; `rho`, ... with prefix=False);
    plain `TrainingArguments` get the paper's defaults."""
    return {(name if prefix else name.removeprefix("esam_")): getattr(args, name, default)
            for name, default in _ESAM_DEFAULTS.items()}


def check_trainer_setup(trainer: Trainer) -> None:
    """Refuse, when the trainer is built, a setup ESAMTrainer cannot run (DeepSpeed, FSDP1, DataParallel, a
    static DDP graph, reentrant gradient checkpointing) or would run wrongly (generation at evaluation without
    Seq2SeqTrainer), or ESAM arguments out of range; each error says what to use instead."""
    fsdp_version = getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None)
    if trainer.is_deepspeed_enabled or (trainer.is_fsdp_enabled and fsdp_version != 2) or trainer.args.n_gpu > 1:
        raise ValueError(
            "ESAMTrainer supports one device (CPU or GPU), multi-GPU DDP (`accelerate launch` or `torchrun`) and "
            "FSDP2 (fsdp_config={'version': 2}, or fsdp_version: 2 in an accelerate config); DeepSpeed, FSDP1 "
            "and single-process DataParallel are not supported: ESAM perturbs and restores the parameters "
            "between two backward passes, which needs the gradient to reach them as torch tensors or FSDP2 "
            "shards."
        )
    if getattr(trainer.args, "predict_with_generate", False) and not isinstance(trainer, Seq2SeqTrainer):
        raise ValueError(
            "predict_with_generate=True needs generation at evaluation, which only Seq2SeqTrainer does: use "
            "esam_hf.ESAMSeq2SeqTrainer with ESAMSeq2SeqTrainingArguments (ESAMTrainer would evaluate without "
            "generating)."
        )
    config = esam_config(trainer.args, prefix=False)
    check_esam_args(**config, prefix="esam_")
    if config["rho"] > 0 and trainer.args.ddp_static_graph:
        raise ValueError(
            "ddp_static_graph=True is not supported by ESAMTrainer at esam_rho > 0: the ascent pass runs "
            "outside DDP's gradient synchronisation and SWP changes which weight gradients are computed "
            "from step to step, so the graph is not static. Leave ddp_static_graph unset."
        )
    if trainer.args.gradient_checkpointing and (trainer.args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        raise ValueError(
            "gradient_checkpointing_kwargs={'use_reentrant': True} is not supported by ESAMTrainer: its ascent "
            "pass takes gradients with torch.autograd.grad, which reentrant checkpointing cannot do. Use "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default)."
        )


class ESAMTrainer(Trainer):
    """`Trainer` whose `training_step` is an ESAM step (SAM with beta = gamma = 1).

    The objective is the Trainer's own loss: both passes differentiate exactly what
    `Trainer.training_step` would (`compute_loss` with its overrides and `compute_loss_func`, the
    model's loss with its auxiliary terms, label smoothing, `num_items_in_batch` token weighting and
    the gradient-accumulation scaling). SDS descends on k of B examples with the same loss on
    those k, normalised as the Trainer normalises a batch (per label token for token-level losses).

    Args:
        per_example_loss_func: optional `(outputs, labels) -> Tensor[B]` giving the per-example
            losses that SDS ranks, for heads `esam_hf.losses.per_example_scores` does not cover.
            Only used to rank examples (never differentiated). Every other argument is `Trainer`'s.
    """

    def __init__(self, *args, per_example_loss_func: Callable[[Any, Any], torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_trainer_setup(self)
        self.per_example_loss_func = per_example_loss_func
        self.esam: ESAM | None = None
        # Which pass `compute_loss` is running: "clean" (at w), "perturbed" (at w + e, no grad, SDS
        # scores) or "descent" (at w + e, the trained gradient). An override with side effects (counting,
        # logging metrics) should act only when it is "clean": it runs up to three times per step.
        self.esam_pass: str | None = None
        self._head = model_head(self.model)  # the loss the model trains: how SDS scores its examples
        self._head_inferred = False
        self._scores_checked = False
        self._outputs_loss_scale = 1  # what the Trainer multiplied the model's own loss by, in `outputs` too
        self._warned_batch_of_one = False
        self._class_shares, self._class_share_steps, self._warned_concentration = None, 0, False
        self._first_loss: tuple[float, int] | None = None  # (the first logged loss, its global step)
        self.nonfinite_guard = NonFiniteGradientGuard()
        self.add_callback(self.nonfinite_guard)

    def _get_esam(self) -> ESAM:
        if self.esam is None:
            c = esam_config(self.args, prefix=False)
            self.esam = ESAM(self.model, rho=c["rho"], beta=c["beta"], gamma=c["gamma"], adaptive=c["adaptive"],
                             bn_stats=c["bn_stats"], selection=c["selection"], seed=self.args.seed)
            self._head, self._head_inferred, self._scores_checked = model_head(self.model), False, False
        return self.esam

    def train(self, *args, **kwargs):
        check_training_args(self.args, allow_zero_epochs=True)
        self.esam = None  # `model_init` may build a new model
        self._first_loss = None  # the stall warning's reference is this run's first logged loss
        guard = self.nonfinite_guard
        guard.reset()
        guard.scaler = self.accelerator.scaler  # fp16 on a GPU: the GradScaler skips non-finite steps itself
        output = super().train(*args, **kwargs)
        guard.sync(self.state)
        reason = guard.diverged or weights_problem(self.model)
        if reason is not None:
            raise TrainingDiverged(f"training diverged: {reason}. Lower the learning rate or weight decay, or check "
                                   "the data; the weights of this run are not usable.")
        if guard.skipped:
            logger.warning(f"{guard.skipped} optimizer step(s) were skipped because the gradient was not finite.")
            output.metrics["train_skipped_steps"] = guard.skipped
        return output

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        esam = self._get_esam()
        if esam.rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # Scores from step 0 (so a model SDS cannot rank fails before any update), and on the first step
        # of any descent on a subset, random selection included: they show the loss is a mean over examples,
        # which a descent on a subset of the batch needs to keep the objective. An ascent on a subset needs
        # neither: it only aims the perturbation (whose length is rho whatever the loss's scale), and the
        # descent trains the whole batch's loss, so any loss keeps its objective (contrastive ones too).
        with_scores = esam.needs_scores() or (esam.gamma < 1 and esam.selection != "ascent" and not self._scores_checked)
        # The Trainer's count of label tokens in this micro-batch, for normalising SDS subsets.
        count = self._label_count(inputs) if num_items_in_batch is not None else None
        self._warn_batch_of_one(inputs)

        passes = []

        def loss_fn(batch):
            items = num_items_in_batch
            if count is not None and batch is not inputs:  # an SDS subset: per label token, as a batch
                items = num_items_in_batch * (self._label_count(batch).clamp_min(1) / count.clamp_min(1))
            self.esam_pass = "clean" if not passes else "perturbed" if not torch.is_grad_enabled() else "descent"
            passes.append(self.esam_pass)
            loss, outputs = self.training_loss(model, batch, items)
            # The descent's own scores would rank nothing: only the passes on the whole batch are scored.
            scored = with_scores and self.esam_pass != "descent"
            return loss, self.compute_per_example_loss(outputs, batch, items) if scored else None

        loss = esam.step(
            loss_fn, inputs,
            backward=self.accelerator.backward,
            no_sync=lambda: self.accelerator.no_sync(model),
            grad_scaler=self.accelerator.scaler,
            gamma=self.current_gamma(),
            groups=inputs.get("labels") if esam.selection == "balanced" else None,
        )
        self.esam_pass = None
        # A uniform random subset cannot concentrate on a class: only scored selections are watched.
        if esam.last_selection is not None and self._head == "classification" and esam.needs_scores():
            self._record_class_shares(inputs.get("labels"), esam.last_selection)
        return loss

    def _record_class_shares(self, labels: torch.Tensor | None, index: torch.Tensor) -> None:
        """Share of the most frequent class among the rows SDS kept, and in the whole batch. Far
        apart, SDS descends on one class at a time: at a loss plateau, sharpness selection keeps
        the batch's majority class (the perturbation hurts it most), and training can stall."""
        if labels is None or labels.dim() != 1 or labels.is_floating_point():
            return

        def top_share(rows):  # no bincount: its output size would need a host sync
            return (rows[:, None] == rows[None, :]).sum(1).max() / rows.shape[0]

        shares = torch.stack([top_share(labels.index_select(0, index)), top_share(labels)]).float()
        self._class_shares = shares if self._class_shares is None else self._class_shares + shares
        self._class_share_steps += 1

    def training_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> tuple[torch.Tensor, Any]:
        """`(loss, outputs)`: the loss `Trainer.training_step` differentiates on `inputs`, i.e.
        `compute_loss` scaled for gradient accumulation as the Trainer scales it."""
        if (self.args.torch_compile or hasattr(self.model, "_orig_mod")) and esam_config(self.args)["esam_gamma"] < 1:
            # SDS subsets have k rows, not B: one graph for both sizes instead of a recompile for k.
            _mark_batch_dynamic(inputs)
        with self.compute_loss_context_manager():
            # compute_loss pops `labels` when it computes the loss itself: give it its own dict.
            result = self.compute_loss(model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
        if not self._scores_checked:
            # `Trainer.compute_loss` scales the loss in place (`loss *= ...`): when that loss is the model's
            # own tensor, the loss in `outputs` is scaled too, and the first-batch check has to undo it.
            own = loss is output_loss(outputs)
            self._outputs_loss_scale = self._compute_loss_scale(num_items_in_batch) if own else 1
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.2x lets subclasses declare it
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        return loss, outputs

    def _compute_loss_scale(self, num_items_in_batch) -> int:
        """The factor `Trainer.compute_loss` multiplies the loss by: under `average_tokens_across_devices` the
        label count `num_items_in_batch` is summed over the processes, so a loss normalised by it is multiplied
        back by their number (the gradient all-reduce averages over them)."""
        if not (self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func)
                and num_items_in_batch is not None):
            return 1
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return self.accelerator.num_processes // tp_size

    def compute_per_example_loss(self, outputs: Any, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Per-example losses [B] that SDS ranks (no gradient): `per_example_loss_func` if given, else
        the loss of the model's head (`esam_hf.losses.per_example_scores`) with `label_smoothing_factor`.

        A model that declares no head we know is scored as a single-label classifier when its outputs can
        only mean that (float `logits` [B, C], integer `labels` [B]). On the first batch, the scores of any
        head must reduce to the loss the model returned; if they do not, the guess is refused (a declared
        head only warns: its loss may add auxiliary terms)."""
        if outputs is None:
            raise ValueError(
                "compute_loss returned no outputs with return_outputs=True, so SDS cannot rank the examples: "
                "return (loss, outputs) from your compute_loss, pass per_example_loss_func=, or train with "
                "esam_gamma=1."
            )
        with torch.no_grad():
            if self.per_example_loss_func is not None:  # the user's word that a subset keeps the objective
                self._scores_checked = True
                return self.per_example_loss_func(outputs, inputs.get("labels")).detach()
            if self._head is None:
                self._head = infer_head(outputs, inputs)
                self._head_inferred = True
                if self._head is None:
                    raise ValueError(unknown_loss_message(self.model))
            config = getattr(unwrap_model(self.model), "config", None)
            scores = per_example_scores(self._head, outputs, inputs, config, self.args.label_smoothing_factor)
            if not self._scores_checked:
                self._check_scores(scores, outputs, inputs, num_items_in_batch)
                self._scores_checked = True
            return scores

    def _check_scores(self, scores, outputs, inputs, num_items_in_batch) -> None:
        """First batch: do the per-example losses reduce to the loss the model returned? (One host read.)

        The model's loss is a mean over this micro-batch (per label token for token-level heads), or, when
        the Trainer passed it `num_items_in_batch`, possibly a sum over that count (the accumulated batch
        on every process); the Trainer's own scaling of it (by the number of processes) is undone first."""
        loss = output_loss(outputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            if self._head_inferred and self.label_smoother is None:
                raise ValueError(unknown_loss_message(self.model, " (its outputs hold no loss to check a guess against)"))
            return  # the Trainer computes the loss itself (label smoothing) from the same logits
        problem = reduction_mismatch(self._head, scores, loss, inputs, num_items_in_batch, self._outputs_loss_scale)
        if problem is None:
            return
        if self._head_inferred:
            raise ValueError(unknown_loss_message(self.model, problem))
        logger.warning(f"SDS ranks {type(unwrap_model(self.model)).__name__}'s examples by their {self._head} losses, "
                       f"which do not reduce to the loss it returned{problem}: the model's loss adds other terms. "
                       "Ranking still uses the main loss; pass per_example_loss_func= to rank by something else.")

    def _warn_batch_of_one(self, inputs) -> None:
        if self._warned_batch_of_one or self.esam.gamma >= 1:
            return
        from .esam import batch_size_of

        try:
            size = batch_size_of(inputs)
        except ValueError:
            return
        if size == 1:
            self._warned_batch_of_one = True
            logger.warning(
                "SDS is off: at per_device_train_batch_size 1 it keeps k = ceil(esam_gamma * 1) = 1 example, the "
                "whole batch. SDS selects within each micro-batch (gradient accumulation does not pool them), so "
                "use a per-device batch of at least 2 for SDS to save anything; SWP still applies."
            )

    def _label_count(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Label tokens in `inputs`, counted as the Trainer counts `num_items_in_batch` (over shifted labels
        when it says the model's loss shifts them)."""
        labels = inputs.get("shift_labels")
        if labels is None:
            shifts = getattr(self, "_loss_shifts_labels", self._head == "causal_lm")
            labels = inputs["labels"][..., 1:] if shifts else inputs["labels"]
        return labels.ne(-100).sum()

    def current_gamma(self) -> float:
        """SDS fraction for this step: `esam_gamma`, or on its warm-up schedule. A function of
        the global step alone, so resumed runs and every DDP rank agree without extra state."""
        c = esam_config(self.args, prefix=False)
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 1.0
        return scheduled_gamma(c["gamma"], progress, c["gamma_warmup"], c["gamma_schedule"])

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.esam is not None and "loss" in logs:
            stats = self.esam.pop_stats()
            # Per micro-batch, the norm and the rise are those of its share of the accumulated loss.
            for key in ("esam/ascent_grad_norm", "esam/sharpness"):
                if key in stats:
                    stats[key] *= self.args.gradient_accumulation_steps
            logs.update(stats)
            logs.update(self._pop_class_shares(logs["loss"]))
        if "loss" in logs:
            self.nonfinite_guard.sync(self.state, self.control)
            logs["esam/skipped_steps"] = self.nonfinite_guard.skipped
        super().log(logs, *args, **kwargs)

    def _pop_class_shares(self, loss: float | None = None) -> dict[str, float]:
        """The class shares since the last log; a warning when SDS concentrates on one class while the
        loss is not falling: still above STALL_DROP of the first logged loss at least STALL_STEPS optimizer
        steps after it. Concentration alone is common in healthy runs, and a warning that fires on them
        would teach users to ignore it."""
        if not self._class_share_steps:
            return {}
        selected, batch = (self._class_shares / self._class_share_steps).tolist()
        self._class_shares, self._class_share_steps = None, 0
        step = self.state.global_step
        if self._first_loss is None and loss is not None:
            self._first_loss = (loss, step)
        first, first_step = self._first_loss or (None, step)
        stalled = loss is not None and step - first_step >= STALL_STEPS and loss > STALL_DROP * first
        if selected - batch > CONCENTRATION_WARNING and stalled and not self._warned_concentration:
            self._warned_concentration = True
            logger.warning(
                f"SDS is descending on one class at a time: the most frequent class makes up {selected:.0%} of the "
                f"examples it keeps against {batch:.0%} of the batch, and the loss ({loss:.4g}) is still above "
                f"{STALL_DROP:.0%} of the first logged loss ({first:.4g}) {step - first_step} steps later. Sharpness "
                "selection keeps the examples the perturbation hurts most, which near a loss plateau are the batch's "
                "majority class, and training can stall there. Use esam_gamma_warmup (e.g. 0.3), "
                "esam_selection='ascent' (the default), or a larger learning rate; see the README's 'When SDS stalls'."
            )
        return {"esam/sds_top_class_share": selected, "esam/batch_top_class_share": batch}

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """Write the model card as README.md in `output_dir`; `push_to_hub(**kwargs)` calls this with its kwargs.

        Image classifiers (a `TimmWrapperForImageClassification`, or `tasks="image-classification"`) get
        esam_hf's image card and their `preprocessor_config.json`; other models get the Trainer's own card
        plus an ESAM section. `dataset` is a Hub id (goes into the metadata) or a local path (named in the
        text only); `kwargs` may hold `dataset_name`, `dataset_config`, `eval_split`, `eval_samples`,
        `eval_split_size` and `recipe` (see `esam_hf.hub.create_model_card`)."""
        if not self.is_world_process_zero():
            return
        from .hub import create_model_card

        create_model_card(
            self, super().create_model_card, esam=esam_config(self.args), language=language, license=license,
            tags=tags, model_name=model_name, finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags,
            dataset=dataset, dataset_args=dataset_args, **kwargs,
        )

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self.nonfinite_guard.grad_norm = grad_norm  # its finite flag, without a second pass over the gradients
        return grad_norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is not None and not _internal_call and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            # With sharded checkpoints (state_dict_type SHARDED_STATE_DICT) Trainer.save_model writes nothing at
            # all; gather the weights on rank 0 (every rank takes part) and write the folder from_pretrained reads.
            self._save(output_dir or self.args.output_dir, state_dict=self.accelerator.get_state_dict(self.model))

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with naming_full_disk(folder):
            super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_esam_state(self._get_esam(), output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with naming_damaged_checkpoint(checkpoint, "optimizer and scheduler state"):
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint and not load_esam_state(self._get_esam, checkpoint):
            logger.warning(f"{checkpoint} has no {ESAM_STATE_NAME}: the SWP generator restarts from its seed, so the "
                           "resumed run repeats the perturbation draws of its first steps.")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with naming_damaged_checkpoint(resume_from_checkpoint, "model weights"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
        with naming_damaged_checkpoint(os.path.join(checkpoint, name) if checkpoint else None, "random-number state"):
            super()._load_rng_state(checkpoint)


@dataclass
class ESAMSeq2SeqTrainingArguments(ESAMTrainingArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` (`predict_with_generate`, `generation_max_length`, ...) plus ESAM's."""


class ESAMSeq2SeqTrainer(ESAMTrainer, Seq2SeqTrainer):
    """`Seq2SeqTrainer` (generation at evaluation and prediction) whose training step is ESAM's:
    a drop-in for `Seq2SeqTrainer` exactly as `ESAMTrainer` is for `Trainer`."""


def _mark_batch_dynamic(batch: dict[str, Any]) -> None:
    """Let `torch.compile` trace the batch dimension of `batch`'s tensors as a size, not a constant (where
    the model does not fix it)."""
    from .esam import batch_size_of

    try:
        size = batch_size_of(batch)
    except ValueError:
        return
    for value in batch.values() if isinstance(batch, dict) else ():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == size:
            torch._dynamo.maybe_mark_dynamic(value, 0)
