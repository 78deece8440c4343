"""ESAM: Efficient Sharpness-Aware Minimization (Du et al., ICLR 2022). Depends on torch only.

`ESAM.step(loss_fn, batch)` runs one step. `loss_fn(batch) -> (loss, scores)` gives the scalar
objective on a batch (what is differentiated) and, when SDS must rank the batch, per-example
losses `scores` [B] (detached; they only rank examples, they are never trained on):
  1. ascent: gradient of the objective at w. Stochastic Weight Perturbation (SWP) keeps each
     trainable tensor with probability beta; gradients are requested for kept tensors only, so
     autograd skips the weight-gradient kernels of the rest.
  2. perturb the kept tensors by e = rho/beta * g/||g||
     (adaptive, ASAM: e = rho/beta * w^2 g / || |w| g ||).
  3. Sharpness-sensitive Data Selection (SDS): keep k = max(1, ceil(gamma B)) examples, the ones
     whose loss rises most from w to w + e (scores of a no-grad pass at w + e minus those at w).
  4. descent: backward of the objective on those k examples at w + e.
  With selection "ascent", SDS moves to the other pass: the ascent (1) runs on a uniform random k of
  the B examples and the descent (4) on the whole batch, so every example is still trained on.
  5. restore w bit-exactly from a saved copy; the caller's optimizer steps with .grad.

rho = 0 is plain training; beta = gamma = 1 is SAM.

Distributed: under DDP each rank perturbs with the gradient of its own batch (the ascent runs under
`no_sync`). Under FSDP2 (`fully_shard`, sharded DTensor parameters) the gradient reaches a parameter only
through FSDP's reduce-scatter into `.grad`, so the ascent is a `.backward()` of the global batch's
objective (averaged over ranks), its norm is all-reduced over the shards, and each rank perturbs and
restores its own shard; SDS still selects within each rank's batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BN_STATS_MODES = ("clean", "all")
GAMMA_SCHEDULES = ("linear", "cosine")
# How SDS picks its k examples: the paper's instance sharpness l_i(w + e) - l_i(w), the loss
# l_i(w + e) alone, a uniform random subset (unbiased, and no selection forward pass), the sharpest
# share of each group (class) of the batch, so the descent is not dominated by one class, or the
# largest losses at w, which the ascent pass already has (no selection forward pass either). "ascent"
# subsets the other pass: the perturbation comes from a random k examples (m-sharpness, Foret et al.
# 2021), the descent uses the whole batch. The descent is the expensive pass (every weight gradient)
# and the one that trains, so this keeps SGD's data per step and saves on the pass that only aims.
SELECTIONS = ("sharpness", "loss", "random", "balanced", "clean_loss", "ascent")


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


def index_batch(batch: Any, index: torch.Tensor, batch_size: int, _path: str = "batch", _top: bool = True) -> Any:
    """Rows `index` of a batch of `batch_size` examples, decided by one rule, not by shape coincidences:

    - the batch itself, and every mapping, dataclass or namedtuple in it, is a container of parts;
      so is a top-level list or tuple holding tensors or containers (a collated `(inputs, targets, ...)`),
      while a top-level list of plain items (strings, ...) has one per example;
    - a tensor whose first dimension is `batch_size` is per-example: its rows are selected; any other
      tensor (class weights, a temperature, a scalar) is shared and passed unchanged;
    - a nested list or tuple of `batch_size` items is one item per example (e.g. per-image box tensors),
      selected on the host (one device synchronisation, `index.tolist()`); one of any other length is
      a container of parts. Ambiguous: a nested sequence of `batch_size` tensors that each have
      `batch_size` rows (items, or per-example parts?): a ValueError names it.
    """
    def recurse(value, where):
        return index_batch(value, index, batch_size, where, _top=False)

    if isinstance(batch, torch.Tensor):
        return batch.index_select(0, index) if batch.dim() > 0 and batch.shape[0] == batch_size else batch
    if isinstance(batch, Mapping):
        items = {key: recurse(value, f"{_path}[{key!r}]") for key, value in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: recurse(getattr(batch, f.name), f"{_path}.{f.name}")
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, (list, tuple)):
        parts = any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) or dataclasses.is_dataclass(v) for v in batch)
        if (_top and parts) or hasattr(batch, "_fields") or len(batch) != batch_size:  # a container of parts
            items = [recurse(value, f"{_path}[{i}]") for i, value in enumerate(batch)]
        else:  # one item per example
            if all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size for v in batch):
                raise ValueError(
                    f"SDS cannot tell how to select examples from {_path}: a {type(batch).__name__} of {batch_size} "
                    f"tensors with {batch_size} rows each, at batch size {batch_size}: one item per example, or "
                    "per-example parts? Stack per-example parts into one tensor, or use esam_gamma=1."
                )
            items = [batch[i] for i in index.tolist()]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def batch_size_of(batch: Any) -> int:
    """Rows of a batch: the first dimension of its first tensor, or the length of a list of examples."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = (batch.values() if isinstance(batch, Mapping)
              else [getattr(batch, f.name) for f in dataclasses.fields(batch)] if dataclasses.is_dataclass(batch)
              else batch if isinstance(batch, (list, tuple)) else [])
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in values:
        if isinstance(value, (Mapping, list, tuple)) or dataclasses.is_dataclass(value):
            return batch_size_of(value)
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch)
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}: it holds no tensor")


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = (batch.values() if isinstance(batch, Mapping)
              else [getattr(batch, f.name) for f in dataclasses.fields(batch)] if dataclasses.is_dataclass(batch)
              else batch if isinstance(batch, (list, tuple)) else [])
    return next((t for t in map(_first_tensor, values) if t is not None), None)


def _ascent_gradients(loss: torch.Tensor, kept: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    # autograd.grad leaves .grad (the accumulated descent gradients) untouched; allow_unused: a
    # trainable tensor this forward did not use (an unused branch, a frozen-by-routing expert) simply
    # gets no perturbation.
    try:
        return torch.autograd.grad(loss, kept, allow_unused=True)
    except RuntimeError as e:
        if "Checkpointing is not compatible" in str(e):
            raise RuntimeError(
                "ESAM's ascent pass takes gradients with torch.autograd.grad, which reentrant activation "
                "checkpointing (use_reentrant=True) does not support. Use non-reentrant checkpointing: "
                "TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False}) or "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
            ) from e
        raise


def _sharding(model: nn.Module, params: list[torch.Tensor]):
    """(process group of the shards, its device type, FSDP2 modules) for a model sharded with `fully_shard`,
    else (None, None, [])."""
    sharded = [type(p).__name__ == "DTensor" for p in params]
    if not any(sharded):
        return None, None, []
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    meshes = {p.device_mesh for p in params} if all(sharded) and fsdp_modules else set()
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise NotImplementedError(
            "ESAM supports sharded (DTensor) parameters when they are FSDP2's (fully_shard) on one 1-D device mesh, "
            "every parameter sharded: this model mixes sharded and plain parameters, uses a multi-dimensional mesh "
            "(HSDP, tensor parallel), or shards without fully_shard. Construct ESAM after fully_shard."
        )
    mesh = next(iter(meshes))
    return mesh.get_group(), mesh.device_type, fsdp_modules


def _sharded_ascent_gradients(loss: torch.Tensor, params: list[torch.Tensor], kept: list[torch.Tensor]):
    # Under fully_shard the forward runs on all-gathered copies: autograd.grad cannot reach the sharded
    # parameters (it returns None for them), only a backward does, through FSDP's reduce-scatter into
    # .grad. So the descent gradient accumulated so far is set aside, the ascent lands in .grad (every
    # weight gradient is computed: SWP saves no kernels here), and the accumulated gradient is put back.
    accumulated = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        return tuple(None if p.grad is None else p.grad.to_local() for p in kept)
    finally:
        for p, g in zip(params, accumulated):
            p.grad = g


def _rank_within_groups(score: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """A key whose top k are about the top k/B share of every group: minus the fraction of an example's
    own group that scores above it. Built from a [B, B] comparison, so it needs no host synchronisation."""
    same = groups[:, None] == groups[None, :]
    ahead = (same & (score[None, :] > score[:, None])).sum(1)
    # Distinct fractions (a + 0.5)/n differ by at least 0.5/B^2; the score squashed below that breaks ties
    # between groups towards the sharper example without reordering anything else.
    return -(ahead + 0.5) / same.sum(1) + 0.5 * torch.sigmoid(score) / (score.numel() ** 2 + 1)


class ESAM:
    """Perturb-and-restore training step of ESAM (SAM with beta = gamma = 1).

    Args:
        model: the module whose trainable parameters are perturbed (the unwrapped model). The
            trainable set is read at every step, so freezing or unfreezing layers mid-training works.
        rho: neighbourhood radius; 0 turns sharpness-awareness off.
        beta: SWP, probability that a parameter tensor is perturbed (1 = off).
        gamma: SDS, fraction of the batch used for the descent gradient (1 = off).
        adaptive: ASAM's scale-invariant perturbation.
        bn_stats: "clean" updates BatchNorm running statistics only in the pass at w;
            "all" in every forward pass, as the authors' code does.
        seed: seeds the SWP generator; use the same seed on every rank.
        selection: SDS score, one of SELECTIONS ("sharpness" is the paper's); "ascent" moves SDS to the
            ascent pass (a random gamma of the batch), the descent then using the whole batch.
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
        self._all_params = list(model.parameters())
        self._shard_group, self._shard_device, self._fsdp_modules = _sharding(model, self._all_params)
        self._batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # CPU generator: drawing the SWP mask never waits for the device, and the same
        # seed gives the same mask on every rank.
        self.generator = torch.Generator().manual_seed(seed)
        self._stats: torch.Tensor | None = None  # device sums: ascent norm, objective rise, skipped
        self._steps = 0
        self._kept_fraction = 0.0
        self._no_gradient_steps = 0
        self.last_selection: torch.Tensor | None = None  # rows SDS kept in the last step (None: all)
        self._permutation: tuple[torch.Tensor, torch.Tensor] | None = None  # (buffer, its first k) for "ascent"

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters trainable now."""
        return [p for p in self._all_params if p.requires_grad]

    def k(self, batch_size: int, gamma: float | None = None) -> int:
        """Examples kept by SDS out of `batch_size`."""
        # The tolerance keeps float error from adding an example (0.6 * 5 = 3.0000000000000004).
        return max(1, math.ceil((self.gamma if gamma is None else gamma) * batch_size - 1e-9))

    def needs_scores(self, gamma: float | None = None) -> bool:
        """Whether `loss_fn` must return per-example scores: SDS ranks the batch."""
        return self.rho > 0 and self.selection not in ("random", "ascent") and (self.gamma if gamma is None else gamma) < 1

    def step(
        self,
        loss_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]],
        batch: Any,
        *,
        backward: Callable[[torch.Tensor], None] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        grad_scaler: Any = None,
        gamma: float | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one ESAM step; leaves the descent gradient accumulated in `.grad`.

        Args:
            loss_fn: maps a batch (or a row subset of it, see `index_batch`) to `(loss, scores)`:
                the scalar objective and per-example losses of shape [B], detached. `scores` may
                be None unless `needs_scores()` (SDS ranking by sharpness or loss).
            batch: tensors (or dicts/tuples/dataclasses of them, or lists of per-example items)
                whose first dimension is the batch.
            backward: called on the descent loss; default `loss.backward()`. Scale for
                gradient accumulation and mixed precision here.
            no_sync: context manager factory that stops DDP from all-reducing the ascent
                gradient (e.g. `ddp_model.no_sync`): each rank perturbs with its own. Not used
                under FSDP2, whose ascent is the global batch's (every backward synchronises).
            grad_scaler: fp16 GradScaler: the ascent loss is scaled so small gradients
                survive; the direction is scale-invariant.
            gamma: this step's SDS fraction instead of `self.gamma` (for schedules).
            groups: integer group of each example [B] (e.g. its class label); needed by
                selection "balanced", which keeps the sharpest share of every group.
        Returns:
            The detached objective at w (with selection "ascent", on the ascent's rows).
        """
        backward = backward or torch.Tensor.backward
        gamma = self.gamma if gamma is None else gamma
        params = self.params
        if self.selection == "balanced" and self.needs_scores(gamma):
            self._check_groups(groups, batch_size_of(batch))
        kept = self._draw_kept(params) if self.rho > 0 else []
        if not kept:
            loss, _ = loss_fn(batch)
            backward(loss)
            self.last_selection = None
            return loss.detach()

        sharded = bool(self._fsdp_modules)
        if sharded:
            self._require_gradient_sync()
        ascent_batch, ascent_index = batch, None
        if self.selection == "ascent":
            batch_size = batch_size_of(batch)
            if self.k(batch_size, gamma) < batch_size:
                ascent_index = self._random_rows(batch_size, self.k(batch_size, gamma), _first_tensor(batch))
                ascent_batch = index_batch(batch, ascent_index, batch_size)
        with no_sync() if no_sync and not sharded else contextlib.nullcontext():
            loss, clean_scores = loss_fn(ascent_batch)
            scale = grad_scaler.scale(torch.ones((), device=loss.device)) if grad_scaler else None
            scaled = loss * scale if scale is not None else loss
            grads = _sharded_ascent_gradients(scaled, params, kept) if sharded else _ascent_gradients(scaled, kept)
        loss = loss.detach()
        kept, grads = [p for p, g in zip(kept, grads) if g is not None], [g for g in grads if g is not None]
        if sharded:  # perturb and restore each rank's own shard
            with torch.no_grad():
                kept = [p.to_local() for p in kept]
        if kept:
            self._no_gradient_steps = 0
            backup, norm, keep = self._perturb(kept, grads)
        else:  # every kept tensor went unused by this forward: nothing to perturb
            self._check_gradient_reaches()
            backup, norm, keep = None, loss.new_zeros((), dtype=torch.float32), loss.new_ones((), dtype=torch.float32)
        del grads
        try:
            with self._frozen_bn_stats():
                batch_size = (clean_scores.shape[0] if clean_scores is not None and ascent_index is None
                              else batch_size_of(batch))
                k = self.k(batch_size, gamma)
                index, rise = None, None
                if self.selection == "ascent":
                    pass  # the descent takes the whole batch
                elif k < batch_size and self.selection == "random":
                    index = self._random_rows(batch_size, k, loss)
                elif k < batch_size and self.selection == "clean_loss":
                    index = self._selection_score(clean_scores, clean_scores, batch_size).topk(k, sorted=False).indices
                elif k < batch_size:
                    with torch.no_grad():
                        perturbed_loss, perturbed_scores = loss_fn(batch)
                    rise = perturbed_loss - loss
                    score = self._selection_score(clean_scores, perturbed_scores, batch_size)
                    if self.selection == "balanced":
                        score = _rank_within_groups(score, groups)
                    index = score.topk(k, sorted=False).indices
                descent, _ = loss_fn(batch if index is None else index_batch(batch, index, batch_size))
                backward(descent)
        finally:
            self._restore(kept, backup)
        # Rise of the objective from w to w + e; without a selection pass (random, clean_loss) estimated
        # from the subset's loss at w + e against the batch's at w (biased upwards under clean_loss), under
        # "ascent" from the batch's loss at w + e against the ascent rows' at w (unbiased for a mean loss).
        rise = descent.detach() - loss if rise is None else rise
        self._record(norm if scale is None else norm / scale, keep, rise, len(kept) / len(params))
        self.last_selection = ascent_index if self.selection == "ascent" else index
        return loss

    def _require_gradient_sync(self) -> None:
        # The ascent needs the reduce-scattered gradient, and a backward without sync would leave an
        # unsharded partial sum inside FSDP that the next synchronised backward folds in: every backward of
        # an ESAM step synchronises, accumulation micro-batches included (one reduce-scatter each).
        for module in self._fsdp_modules:
            module.set_requires_gradient_sync(True, recurse=False)

    def _check_gradient_reaches(self) -> None:
        """No ascent gradient reached any kept tensor. An SWP draw of only unused tensors (an unused branch)
        can do that now and then; with every trainable tensor kept, or three steps in a row, it is a
        mistake that would make ESAM plain training without a word."""
        self._no_gradient_steps += 1
        if self.beta == 1 or self._no_gradient_steps >= 3:
            raise RuntimeError(
                "ESAM's ascent produced no gradient for any perturbed tensor: the loss does not depend on the "
                "trainable parameters of the model given to ESAM. Pass the model that computes the loss (not a copy "
                "or a wrapper's inner module built separately)."
            )

    def _selection_score(self, clean, perturbed, batch_size):
        for name, scores in (("at w", clean), ("at w + e", perturbed)):
            if scores is None or tuple(scores.shape) != (batch_size,):
                got = "None" if scores is None else f"shape {tuple(scores.shape)}"
                raise ValueError(
                    f"SDS selection {self.selection!r} ranks examples by their losses, but loss_fn returned "
                    f"per-example scores {got} {name} for a batch of {batch_size}: return (loss, scores) with "
                    "scores of shape [B], or use selection='random' (no scores needed) or gamma=1."
                )
        if self.selection == "clean_loss":
            return clean
        return perturbed if self.selection == "loss" else perturbed - clean

    @staticmethod
    def _check_groups(groups, batch_size):
        if not isinstance(groups, torch.Tensor) or tuple(groups.shape) != (batch_size,) or groups.is_floating_point():
            got = type(groups).__name__ if not isinstance(groups, torch.Tensor) else f"{groups.dtype} {tuple(groups.shape)}"
            raise ValueError(
                f"SDS selection 'balanced' ranks examples within their groups: pass groups= an integer tensor of "
                f"shape [{batch_size}] (e.g. the class labels), got {got}; or use selection 'sharpness' or 'random'."
            )
        return groups

    def _random_rows(self, batch_size: int, k: int, like: torch.Tensor | None) -> torch.Tensor:
        """k rows of `batch_size` drawn uniformly without replacement, on the batch's device. A permutation
        is drawn into a buffer kept while the shapes stay, whose first k entries are the rows: no allocation
        and no slicing per step (the rows hold until the next step)."""
        device = like.device if like is not None else torch.device("cpu")
        if self._permutation is None or self._permutation[0].shape[0] != batch_size or \
                self._permutation[1].shape[0] != k or self._permutation[0].device != device:
            buffer = torch.empty(batch_size, dtype=torch.long, device=device)
            self._permutation = (buffer, buffer[:k])
        torch.randperm(batch_size, out=self._permutation[0])
        return self._permutation[1]

    def _draw_kept(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.beta == 1 or not params:
            return params
        # Compared on the host in float32, as `torch.rand(n) < beta` compares: the same draws, fewer dispatches.
        bound = struct.unpack("f", struct.pack("f", self.beta))[0]
        mask = [u < bound for u in torch.rand(len(params), generator=self.generator).tolist()]
        if not any(mask):
            # An empty draw would make this a plain step (likely with few trainable tensors, e.g. LoRA
            # or a linear probe): perturb one tensor, drawn uniformly, so every step is sharpness-aware.
            mask[int(torch.randint(len(params), (1,), generator=self.generator))] = True
        return [p for p, keep in zip(params, mask) if keep]

    @torch.no_grad()
    def _perturb(self, kept, grads):
        # Multi-tensor (foreach) ops throughout: a handful of dispatches per step whatever the number of
        # tensors, where per-tensor ops or views into a flat buffer cost one each (host time a GPU step waits on).
        backup = torch._foreach_mul(kept, 1.0)  # an exact copy, restored bit for bit
        # Sparse gradients (nn.Embedding(sparse=True)) perturb densely: e is a dense direction.
        grads = [(g if g.layout == torch.strided else g.to_dense()).to(p.dtype) for p, g in zip(kept, grads)]
        if self.adaptive:  # norm of |w| g; e along w^2 g
            w_abs = torch._foreach_abs(kept)
            torch._foreach_mul_(grads, w_abs)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self._shard_group is not None:  # the norm over every rank's shard
            # (on the mesh's device: with CPU offloading the shards live on the host, NCCL reduces on the GPU)
            total = norm.square().to(self._shard_device)
            dist.all_reduce(total, group=self._shard_group)
            norm = total.sqrt().to(norm.device)
        finite = norm < math.inf  # False for NaN too; one op where isfinite takes three
        keep = finite.float()
        if self.adaptive:
            torch._foreach_mul_(grads, w_abs)
        torch._foreach_mul_(grads, (self.rho / self.beta) / (norm + self.eps))
        # A non-finite gradient must give e = 0 without a host sync, and no foreach op zeroes NaN (NaN * 0 is
        # NaN) except a power: e^1 = e, e^0 = 1 for every e, NaN included, then times 0. (A list of 0-dim
        # exponents: a plain tensor exponent would be read on the host; CUDA loops over the tensors in C++.)
        torch._foreach_pow_(grads, [keep] * len(grads))
        torch._foreach_mul_(grads, keep)
        torch._foreach_add_(kept, grads)
        return backup, norm, keep

    @torch.no_grad()
    def _restore(self, kept, backup):
        if kept:
            torch._foreach_copy_(kept, backup)

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

    def _record(self, norm, keep, rise, kept_fraction):
        # (the norm is >= 0, NaN or inf: nan_to_num zeroes the last two in one op)
        step_stats = torch.stack([norm.float().nan_to_num(0.0, 0.0), rise.float(), 1 - keep])
        self._stats = step_stats if self._stats is None else self._stats + step_stats
        self._steps += 1
        self._kept_fraction += kept_fraction

    def pop_stats(self) -> dict[str, float]:
        """Means over the steps since the last call (one host sync: call it at logging steps only):
        the ascent gradient norm, the rise of the objective from w to w + e, the fraction of
        trainable tensors SWP perturbed, and the count of perturbations skipped because the ascent
        gradient was not finite."""
        if not self._steps:
            return {}
        norm_sum, rise_sum, skipped = self._stats.tolist()
        stats = {
            "esam/ascent_grad_norm": norm_sum / max(1, self._steps - skipped),
            "esam/sharpness": rise_sum / self._steps,
            "esam/swp_kept_fraction": self._kept_fraction / self._steps,
            "esam/skipped_perturbations": skipped,
        }
        self._stats, self._steps, self._kept_fraction = None, 0, 0.0
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
