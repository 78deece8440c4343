"""Non-finite gradients and weights: the guard that keeps a NaN or infinite gradient from reaching the
weights (`NonFiniteGradientGuard`, a TrainerCallback), the check of the weights after training
(`weights_problem`), and `TrainingDiverged`, which `ESAMTrainer.train` raises for either."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

# Stop as diverged after this many optimizer steps in a row with a non-finite gradient.
NONFINITE_PATIENCE = 10


class TrainingDiverged(RuntimeError):
    """Training ended with non-finite weights, or stopped after non-finite gradients step after step."""


def weights_problem(model: torch.nn.Module) -> str | None:
    """Why `model`'s weights are unusable after training (one host read), or None."""
    # Only trainable floating-point tensors can have changed (4-bit and fp8 weights are integer-coded or
    # have no norm kernel, and frozen ones keep their values).
    params = [p for p in model.parameters()
              if p.requires_grad and p.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    if params and not _all_finite(params):
        return "the weights are no longer finite (NaN or infinite) at the end of training"
    return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) tensor; any other tensor as it is."""
    return tensor.to_local() if type(tensor).__name__ == "DTensor" else tensor


def _sum_over_shards(value: torch.Tensor, params) -> torch.Tensor:
    """`value` summed over the ranks sharing the parameters' FSDP2 mesh (unchanged when they are not sharded)."""
    sharded = next((p for p in params if type(p).__name__ == "DTensor"), None)
    if sharded is None:
        return value
    total = value.to(sharded.device_mesh.device_type, copy=True)  # CPU-offloaded shards: NCCL reduces on the GPU
    torch.distributed.all_reduce(total, group=sharded.device_mesh.get_group())
    return total.to(value.device)


def _local_grads(params) -> list[torch.Tensor]:
    """The gradients as plain tensors: FSDP2 shards local (no DTensor dispatch per op), sparse ones' values."""
    return [_local(p.grad) if p.grad.layout == torch.strided else p.grad._values() for p in params]


def _all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every weight is finite, on every rank's shard (one host read)."""
    local = [_local(p).detach() for p in params]
    bad = (~torch.isfinite(torch.stack(torch._foreach_norm(local)))).sum().float()
    return not bool(_sum_over_shards(bad, params))


class NonFiniteGradientGuard(TrainerCallback):
    """Keeps a non-finite gradient from reaching the weights, and stops training as diverged after
    NONFINITE_PATIENCE optimizer steps in a row with one, without reading anything on the host
    between logging steps.

    The finite flag is the gradient norm the Trainer computes at every optimizer step (for clipping,
    or for logging). When it is not finite, a fused torch optimizer (`fused=True`, e.g. the Trainer's
    default `adamw_torch_fused`) is told so through its `found_inf` input, as a GradScaler tells it, and
    skips the whole update in its kernel; with any other optimizer every gradient is set to 0, so its
    step applies only momentum and weight decay. The counts stay on the device and are read (`sync`,
    one host read) at the Trainer's logging steps and at the end of training, so a diverged run stops
    at the first logging step after the tenth such step in a row. Under an fp16 GradScaler the scaler
    itself skips those steps, and the guard stands down.
    """

    def reset(self):
        self.skipped, self.in_a_row, self.diverged = 0, 0, None
        self._counts: torch.Tensor | None = None  # device: [skipped, current run, longest run since last sync]
        self.grad_norm: torch.Tensor | float | None = None  # set by the trainer before each optimizer step
        self._told: Any = None  # the optimizer given found_inf for this step
        self._fused_ready: Any = None  # the fused optimizer known to skip safely

    def __init__(self):
        self.scaler = None
        self.reset()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or self.scaler is not None:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        norm = self.grad_norm
        if not isinstance(norm, torch.Tensor):  # a Trainer that did not compute it: one pass over the gradients
            norm = torch.stack(torch._foreach_norm(_local_grads(params))).norm()
            # Under FSDP2 each rank holds a shard: every rank must take the same decision.
            norm = _sum_over_shards(norm, params)
        if type(norm).__name__ == "DTensor":  # a norm left as partial sums over the shards
            norm = norm.full_tensor()
        bad = torch.logical_not(norm.detach().to(_local(params[0].grad).device) < math.inf)  # NaN < inf is False
        bad_count = bad.float()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if self._skips_on_device(inner, params):
            inner.found_inf = bad_count
            self._told = inner
        else:
            # No foreach op zeroes NaN (NaN * 0 is NaN): one masked_fill_ per tensor, queued without a sync.
            for g in _local_grads(params):
                g.masked_fill_(bad, 0)
        if self._counts is None:
            self._counts = bad_count.new_zeros(3)
        skipped, run, longest = self._counts.unbind()
        skipped.add_(bad_count)
        run.add_(1).mul_(bad_count)
        torch.maximum(longest, run, out=longest)
        self.grad_norm = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._told is not None:
            del self._told.found_inf
            self._told = None

    def _skips_on_device(self, optimizer, params) -> bool:
        """Whether `optimizer` takes `found_inf` and can skip this step with it. torch's fused optimizers read
        it (`_step_supports_amp_scaling`, the flag GradScaler checks); fused SGD with momentum leaves the
        momentum buffer uninitialised when it skips its very first step, so that one waits for its buffers."""
        if self._fused_ready is optimizer:
            return True
        if not getattr(optimizer, "_step_supports_amp_scaling", False) or type(params[0]).__name__ == "DTensor":
            return False
        for group in optimizer.param_groups:
            if group.get("momentum") and any("momentum_buffer" not in optimizer.state.get(p, {})
                                             for p in group["params"] if p.grad is not None):
                return False
        self._fused_ready = optimizer
        return True

    def sync(self, state=None, control=None) -> None:
        """Read the device counts (one host sync): call at logging steps and at the end of training."""
        if self._counts is None:
            return
        skipped, run, longest = (int(v) for v in self._counts.tolist())
        self.skipped += skipped
        self.in_a_row = run
        self._counts.copy_(self._counts.new_tensor([0, run, run]))
        if longest >= NONFINITE_PATIENCE and self.diverged is None:
            step = f" (by step {state.global_step})" if state is not None else ""
            self.diverged = f"the gradient was not finite in {longest} optimizer steps in a row{step}"
            if control is not None:
                control.should_training_stop = True
