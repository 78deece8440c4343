"""ESAM: Efficient Sharpness-Aware Minimization (Du et al., ICLR 2022). Depends on torch only.

One step, given per-example losses l_i(w) of a batch:
  1. ascent: forward + backward on the whole batch at w. Stochastic Weight Perturbation
     (SWP) keeps each parameter tensor with probability beta; gradients are requested
     for kept tensors only, so autograd skips the weight-gradient kernels of the rest.
  2. perturb the kept tensors by e = rho/beta * g/||g||
     (adaptive, ASAM: e = rho/beta * w^2 g / || |w| g ||).
  3. Sharpness-sensitive Data Selection (SDS): a no-grad forward at w + e gives the
     instance sharpness l_i(w + e) - l_i(w); keep the k = max(1, ceil(gamma B)) sharpest.
  4. descent: forward + backward of the mean loss of those k examples at w + e.
  5. restore w bit-exactly from a saved copy; the caller's optimizer steps with .grad.

rho = 0 is plain training; beta = gamma = 1 is SAM.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

BN_STATS_MODES = ("clean", "all")
GAMMA_SCHEDULES = ("linear", "cosine")
# How SDS picks its k examples: the paper's instance sharpness l_i(w + e) - l_i(w), the loss
# l_i(w + e) alone, or a uniform random subset (unbiased, and no selection forward pass).
SELECTIONS = ("sharpness", "loss", "random")


def scheduled_gamma(gamma: float, progress: float, warmup: float, schedule: str = "linear") -> float:
    """SDS fraction at `progress` in [0, 1] of training: 1 (the whole batch) at the start,
    reaching `gamma` after the `warmup` fraction. Early training is where selecting half
    the batch hurts most; late training is where most steps are, so most of the saving stays."""
    if warmup <= 0 or progress >= warmup:
        return gamma
    ramp = progress / warmup
    if schedule == "cosine":
        ramp = 0.5 * (1 - math.cos(math.pi * ramp))
    return 1.0 - (1.0 - gamma) * ramp


def check_esam_args(rho: float, beta: float, gamma: float, bn_stats: str = "clean", adaptive: bool = False,
                    gamma_warmup: float = 0.0, gamma_schedule: str = "linear", selection: str = "sharpness",
                    prefix: str = "") -> None:
    """Raise ValueError naming the argument and its allowed range."""
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"{prefix}rho must be a finite number >= 0 (0 turns sharpness-awareness off), got {rho!r}")
    for name, value in (("beta", beta), ("gamma", gamma)):
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ValueError(f"{prefix}{name} must be in (0, 1] (1 turns it off), got {value!r}")
    if not isinstance(adaptive, bool):
        raise ValueError(f"{prefix}adaptive must be True or False, got {adaptive!r}")
    if bn_stats not in BN_STATS_MODES:
        raise ValueError(f"{prefix}bn_stats must be one of {BN_STATS_MODES}, got {bn_stats!r}")
    if not (isinstance(gamma_warmup, (int, float)) and 0 <= gamma_warmup <= 1):
        raise ValueError(f"{prefix}gamma_warmup must be in [0, 1] (a fraction of training; 0 = off), got {gamma_warmup!r}")
    if gamma_schedule not in GAMMA_SCHEDULES:
        raise ValueError(f"{prefix}gamma_schedule must be one of {GAMMA_SCHEDULES}, got {gamma_schedule!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"{prefix}selection must be one of {SELECTIONS}, got {selection!r}")


def index_batch(batch: Any, index: torch.Tensor, batch_size: int) -> Any:
    """Select rows `index` of every tensor in `batch` whose first dimension is the batch."""
    if isinstance(batch, torch.Tensor):
        return batch.index_select(0, index) if batch.dim() > 0 and batch.shape[0] == batch_size else batch
    if isinstance(batch, Mapping):
        return {k: index_batch(v, index, batch_size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(index_batch(v, index, batch_size) for v in batch)
    return batch


class ESAM:
    """Perturb-and-restore training step of ESAM (SAM with beta = gamma = 1).

    Args:
        model: the module whose trainable parameters are perturbed (the unwrapped model).
        rho: neighbourhood radius; 0 turns sharpness-awareness off.
        beta: SWP, probability that a parameter tensor is perturbed (1 = off).
        gamma: SDS, fraction of the batch used for the descent gradient (1 = off).
        adaptive: ASAM's scale-invariant perturbation.
        bn_stats: "clean" updates BatchNorm running statistics only in the pass at w;
            "all" in every forward pass, as the authors' code does.
        seed: seeds the SWP generator; use the same seed on every rank.
        selection: SDS score, one of SELECTIONS ("sharpness" is the paper's).
    """

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        adaptive: bool = False,
        bn_stats: str = "clean",
        seed: int = 0,
        selection: str = "sharpness",
        eps: float = 1e-12,
    ):
        check_esam_args(rho, beta, gamma, bn_stats, adaptive, selection=selection)
        self.rho, self.beta, self.gamma, self.adaptive, self.bn_stats, self.eps = rho, beta, gamma, adaptive, bn_stats, eps
        self.selection = selection
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # CPU generator: drawing the SWP mask never waits for the device, and the same
        # seed gives the same mask on every rank.
        self.generator = torch.Generator().manual_seed(seed)
        self._stats: torch.Tensor | None = None  # device sums: ascent norm, sharpness, skipped
        self._steps = 0
        self._kept_fraction = 0.0

    def k(self, batch_size: int, gamma: float | None = None) -> int:
        """Examples kept by SDS out of `batch_size`."""
        # The tolerance keeps float error from adding an example (0.6 * 5 = 3.0000000000000004).
        return max(1, math.ceil((self.gamma if gamma is None else gamma) * batch_size - 1e-9))

    def step(
        self,
        loss_fn: Callable[[Any], torch.Tensor],
        batch: Any,
        *,
        backward: Callable[[torch.Tensor], None] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        grad_scaler: Any = None,
        gamma: float | None = None,
    ) -> torch.Tensor:
        """Run one ESAM step; leaves the descent gradient accumulated in `.grad`.

        Args:
            loss_fn: maps a batch (or a row subset of it) to per-example losses of shape [B].
            batch: tensors (or dicts/tuples of them) whose first dimension is the batch.
            backward: called on the descent loss; default `loss.backward()`. Scale for
                gradient accumulation and mixed precision here.
            no_sync: context manager factory that stops DDP from all-reducing the ascent
                gradient (e.g. `ddp_model.no_sync`): each rank perturbs with its own.
            grad_scaler: fp16 GradScaler: the ascent loss is scaled so small gradients
                survive; the direction is scale-invariant.
            gamma: this step's SDS fraction instead of `self.gamma` (for schedules).
        Returns:
            The detached mean loss at w over the whole batch.
        """
        backward = backward or torch.Tensor.backward
        gamma = self.gamma if gamma is None else gamma
        kept = self._draw_kept() if self.rho > 0 else []
        if not kept:
            losses = loss_fn(batch)
            backward(losses.mean())
            return losses.detach().mean()

        with no_sync() if no_sync else contextlib.nullcontext():
            losses = loss_fn(batch)
            loss = losses.mean()
            # autograd.grad leaves .grad (the accumulated descent gradients) untouched.
            grads = torch.autograd.grad(grad_scaler.scale(loss) if grad_scaler else loss, kept)
        losses = losses.detach()
        backup, norm, finite = self._perturb(kept, grads)
        del grads
        try:
            with self._frozen_bn_stats():
                batch_size, k = losses.shape[0], self.k(losses.shape[0], gamma)
                if k < batch_size and self.selection == "random":
                    index = torch.randperm(batch_size, device=losses.device)[:k]
                    descent = loss_fn(index_batch(batch, index, batch_size))
                    sharpness = descent.detach() - losses.index_select(0, index)
                elif k < batch_size:
                    with torch.no_grad():
                        perturbed = loss_fn(batch).detach()
                    sharpness = perturbed - losses
                    score = sharpness if self.selection == "sharpness" else perturbed
                    index = score.topk(k, sorted=False).indices
                    descent = loss_fn(index_batch(batch, index, batch_size))
                else:
                    descent = loss_fn(batch)
                    sharpness = descent.detach() - losses
                backward(descent.mean())
        finally:
            self._restore(kept, backup)
        self._record(norm, finite, sharpness, len(kept))
        return losses.mean()

    def _draw_kept(self) -> list[torch.Tensor]:
        if self.beta == 1:
            return self.params
        mask = torch.rand(len(self.params), generator=self.generator) < self.beta
        return [p for p, keep in zip(self.params, mask.tolist()) if keep]

    def _views(self, flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    @torch.no_grad()
    def _perturb(self, kept, grads):
        # One flat buffer makes the norm, the finite check and the scaling single kernels,
        # and lets a non-finite gradient become e = 0 without a host sync (inf * 0 = NaN
        # has no foreach cure; nan_to_num on the flat buffer is one kernel).
        backup = torch.cat([p.reshape(-1) for p in kept])
        g = torch.cat([g.reshape(-1) for g in grads]).to(backup.dtype)
        if self.adaptive:  # norm of |w| g; e along w^2 g
            w_abs = backup.abs()
            g.mul_(w_abs)
        norm = torch.linalg.vector_norm(g)
        finite = torch.isfinite(norm)
        scale = torch.where(finite, self.rho / self.beta / (norm + self.eps), 0.0)
        if self.adaptive:
            g.mul_(w_abs)
        g.mul_(scale).nan_to_num_(0.0, 0.0, 0.0)
        torch._foreach_add_(kept, self._views(g, kept))
        return backup, norm, finite

    @torch.no_grad()
    def _restore(self, kept, backup):
        torch._foreach_copy_(kept, self._views(backup, kept))

    @contextlib.contextmanager
    def _frozen_bn_stats(self):
        """In "clean" mode, BatchNorm keeps normalising with batch statistics at w + e
        but does not fold them into its running statistics."""
        modules = [m for m in self._batchnorms if m.track_running_stats] if self.bn_stats == "clean" else []
        for m in modules:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in modules:
                m.track_running_stats = True

    def _record(self, norm, finite, sharpness, num_kept):
        step_stats = torch.stack([torch.where(finite, norm, 0.0), sharpness.float().mean(), (~finite).float()])
        self._stats = step_stats if self._stats is None else self._stats + step_stats
        self._steps += 1
        self._kept_fraction += num_kept / len(self.params)

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (one host sync: call it at logging steps only)."""
        if not self._steps:
            return {}
        norm_sum, sharpness_sum, skipped = self._stats.tolist()
        stats = {
            "esam/ascent_grad_norm": norm_sum / max(1, self._steps - skipped),
            "esam/sharpness": sharpness_sum / self._steps,
            "esam/swp_kept_fraction": self._kept_fraction / self._steps,
            "esam/skipped_perturbations": skipped,
        }
        self._stats, self._steps, self._kept_fraction = None, 0, 0.0
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
