"""The numbers of the flatness analysis: filter-normalised random directions, the loss along them (1-D
slices, 2-D grids) and the top Hessian eigenvalue, of a loss function built from data (`make_loss_fn`).

Importing this module needs only torch (tqdm, for progress bars, is imported where a bar is drawn). The
conventions for directions and loss functions are in the package's docstring (`esam_hf.landscape`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module], "Tensor | float"]


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #
def _randn_like(param: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian noise shaped like ``param``, drawn on the generator's device.

    Drawing on the generator's device (normally CPU) and then moving keeps the
    result identical whether the model lives on CPU or GPU.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(param.shape, generator=generator, device=gen_device, dtype=param.dtype)
    return noise.to(param.device)


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Inner product of two parameter lists (as if they were flattened vectors)."""
    # There is no _foreach reduction to a scalar sum, so only the final per-tensor
    # sums are a Python loop; the elementwise product is one fused _foreach call.
    products = torch._foreach_mul(xs, ys)
    return torch.stack([p.sum() for p in products]).sum()


def _norm(xs: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of a parameter list: the norm of the per-tensor norms."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Put every submodule in eval mode and restore each one's own flag after.

    Restoring per module (rather than ``model.train(was_training)``) preserves
    mixed setups, e.g. a user who froze BatchNorm layers inside a training model.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _weights_restored(params: Sequence[Tensor]):
    """Snapshot ``params`` and copy the snapshot back on exit, even on error.

    Restoring from a saved copy (instead of subtracting the perturbation again)
    makes the restore bit-exact: ``(w + a*d) - a*d`` is not ``w`` in floating point.
    """
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            torch._foreach_copy_(list(params), saved)


def _check_direction(params: Sequence[Tensor], direction: Sequence[Tensor], name: str) -> list[Tensor]:
    direction = list(direction)
    if len(direction) != len(params):
        raise ValueError(f"{name} has {len(direction)} tensors but the model has {len(params)} parameters")
    for i, (p, d) in enumerate(zip(params, direction)):
        if p.shape != d.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(d.shape)}, parameter has {tuple(p.shape)}")
    # Match dtype/device so the in-place _foreach_add_ below never has to cast.
    return [d.to(device=p.device, dtype=p.dtype) for p, d in zip(params, direction)]


def _as_float_tensor(values: Iterable[float] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def _symmetric_grid(points: int, radius: float = 1.0) -> Tensor:
    """``points`` (odd) evenly spaced steps in ``[-radius, radius]`` whose middle one is exactly 0.

    ``torch.linspace(-1, 1, 41)`` puts -5.6e-17 in the middle, so the "trained
    weights" point would be slightly perturbed; integer steps keep it exact.
    """
    if points < 3 or points % 2 == 0:
        raise ValueError(f"points must be an odd integer >= 3, got {points}")
    half = points // 2
    return torch.arange(-half, half + 1, dtype=torch.float64) * (radius / half)


def _progress_bar(total: int, desc: str | None):
    """A tqdm bar labelled ``desc``, or a silent one when ``desc`` is None.

    ``tqdm.auto`` draws a widget in notebooks and text elsewhere.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- #
# 1. Filter-normalised random directions
# --------------------------------------------------------------------------- #
def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None) -> list[Tensor]:
    """Random Gaussian direction with filter normalisation (Li et al., 2018).

    For every parameter with ``ndim > 1`` each filter (slice along dim 0: an
    output channel of a conv, an output row of a linear layer) of the random
    direction is rescaled to the norm of the matching weight filter. Without this,
    scale-invariant networks (BN/ReLU) could look arbitrarily sharp or flat just
    by rescaling weights, and two models could not share an axis.

    Parameters with ``ndim <= 1`` (biases, norm-layer affine params) get a zero
    direction, the paper's "ignore biases and BN" default. No noise is drawn for
    them, so the weight directions depend only on the weight shapes and the seed.
    """
    direction = []
    for param in model.parameters():
        weight = param.detach()
        if weight.dim() <= 1:
            direction.append(torch.zeros_like(weight))
            continue
        noise = _randn_like(weight, generator).reshape(weight.shape[0], -1)
        weight_norms = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        noise_norms = noise.norm(dim=1, keepdim=True)
        # The tiny epsilon only guards against an all-zero noise filter; a
        # zero weight filter correctly yields a zero direction filter.
        direction.append((noise * (weight_norms / (noise_norms + 1e-10))).reshape(weight.shape))
    return direction


# --------------------------------------------------------------------------- #
# 2. Loss-landscape slices
# --------------------------------------------------------------------------- #
def _evaluate_on_grid(
    model: nn.Module,
    loss_fn: LossFn,
    directions: Sequence[Sequence[Tensor]],
    coordinates: Sequence[Sequence[float]],
    progress: str | None = None,
) -> list[float]:
    """Loss at ``w + sum_k c_k * d_k`` for every coordinate tuple ``c``."""
    params = list(model.parameters())
    directions = [_check_direction(params, d, f"direction {k + 1}") for k, d in enumerate(directions)]
    losses = []
    with _eval_mode(model), torch.no_grad(), _weights_restored(params) as saved, _progress_bar(
        len(coordinates), progress
    ) as bar:
        for coords in coordinates:
            # Always start from the saved weights so rounding errors from one grid
            # point never leak into the next.
            torch._foreach_copy_(params, saved)
            for coeff, direction in zip(coords, directions):
                if coeff != 0.0:
                    torch._foreach_add_(params, direction, alpha=float(coeff))
            losses.append(float(loss_fn(model)))
            bar.update()
    return losses


def loss_landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    direction: Sequence[Tensor],
    alphas: Iterable[float] | Tensor,
    progress: str | None = None,
) -> Tensor:
    """Losses ``L(w + a*d)`` for each ``a`` in ``alphas`` (float64 tensor, same length).

    The model is evaluated in eval mode under ``no_grad``; weights and the
    train/eval flags are restored bit-exactly afterwards, also if ``loss_fn`` raises.
    ``progress`` labels a progress bar over the points (None: no bar).
    """
    alphas = _as_float_tensor(alphas)
    losses = _evaluate_on_grid(model, loss_fn, [direction], [(a,) for a in alphas.tolist()], progress)
    return torch.tensor(losses, dtype=torch.float64)


def loss_landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    d1: Sequence[Tensor],
    d2: Sequence[Tensor],
    alphas_1: Iterable[float] | Tensor,
    alphas_2: Iterable[float] | Tensor,
    progress: str | None = None,
) -> Tensor:
    """Losses ``L(w + a*d1 + b*d2)`` as a float64 tensor of shape ``(len(alphas_1), len(alphas_2))``.

    ``losses[i, j]`` belongs to ``(alphas_1[i], alphas_2[j])``. The two random
    directions are not orthogonalised: in high dimension independent Gaussian
    directions are nearly orthogonal already (as argued by Li et al.).
    ``progress`` labels a progress bar over the grid points (None: no bar).
    """
    alphas_1, alphas_2 = _as_float_tensor(alphas_1), _as_float_tensor(alphas_2)
    grid = [(a, b) for a in alphas_1.tolist() for b in alphas_2.tolist()]
    losses = _evaluate_on_grid(model, loss_fn, [d1, d2], grid, progress)
    return torch.tensor(losses, dtype=torch.float64).reshape(len(alphas_1), len(alphas_2))


# --------------------------------------------------------------------------- #
# 3. Top Hessian eigenvalue
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class TopEigenvalue:
    """A power-iteration estimate and how it was reached.

    ``iterations`` counts Hessian-vector products; ``converged`` is False when
    ``max_iters`` ran out before the estimate settled to the tolerance, i.e. the
    value may still be an underestimate. ``float(result)`` is the value.
    """

    value: float
    iterations: int
    converged: bool

    def __float__(self) -> float:
        return self.value


def _power_iteration(
    hvp: Callable[[list[Tensor]], list[Tensor]],
    start: list[Tensor],
    max_iters: int,
    tol: float,
    shift: float = 0.0,
    progress: str | None = None,
) -> TopEigenvalue:
    """Dominant eigenvalue of ``H - shift*I`` by power iteration.

    Uses the Rayleigh quotient ``v^T (H - shift I) v`` of the unit iterate as
    the estimate and stops once its change from the previous iteration is at
    most ``tol`` times its size; one iteration alone can never converge.
    """
    v = start
    torch._foreach_div_(v, _norm(v))
    estimate = None
    with _progress_bar(max_iters, progress) as bar:
        for iteration in range(1, max_iters + 1):
            hv = hvp(v)
            if shift != 0.0:
                torch._foreach_add_(hv, v, alpha=-shift)
            previous, estimate = estimate, _dot(v, hv).item()
            bar.update()
            bar.set_postfix(eigenvalue=f"{estimate + shift:.5g}")
            hv_norm = _norm(hv)
            if hv_norm.item() == 0.0:  # v is in the null space: the estimate 0 is exact
                return TopEigenvalue(estimate, iteration, True)
            if previous is not None and abs(estimate - previous) <= tol * max(abs(previous), 1e-12):
                return TopEigenvalue(estimate, iteration, True)
            v = torch._foreach_div(hv, hv_norm)
    return TopEigenvalue(estimate, max_iters, False)


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    max_iters: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    progress: str | None = None,
) -> TopEigenvalue:
    """Largest eigenvalue of the Hessian of ``loss_fn(model)`` w.r.t. the trainable parameters.

    Matrix-free: the loss and its gradient (with ``create_graph=True``) are built
    once, and each power-iteration step is one extra backward through that graph,
    ``Hv = d(g . v)/dw``. The model is put in eval mode for the duration so that
    dropout/BN randomness does not make the operator change between iterations
    (the same convention as the landscape functions).

    Iterates until the estimate changes by at most ``tol`` (relative) between
    two iterations, or ``max_iters`` run out; the result says which. Power
    iteration converges at the rate ``(lambda_2 / lambda_1)^2`` per step, so a
    small gap between the top two eigenvalues can need far more than 20 steps.

    Power iteration finds the eigenvalue of largest *magnitude*. Near a minimum
    that is the largest positive one; if it comes out negative, a second run on
    ``H - lambda_neg * I`` (whose spectrum is then non-negative) recovers the
    algebraically largest eigenvalue. ``max_iters`` caps each run; ``iterations``
    then counts both and ``converged`` needs both. ``progress`` labels a progress
    bar (None: no bar).
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0 (a relative change), got {tol}")
    params = [p for p in model.parameters() if p.requires_grad]
    with _eval_mode(model), torch.enable_grad():
        loss = loss_fn(model)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise TypeError("loss_fn must return a differentiable scalar tensor for the Hessian")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
        # Gradients that are constant in w (e.g. a parameter the loss is linear in)
        # have no graph; their rows of the Hessian are zero, so just skip them.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return TopEigenvalue(0.0, 0, True)
        live_grads = [grads[i] for i in live]

        def hvp(v: list[Tensor]) -> list[Tensor]:
            # grad(g, w, grad_outputs=v) == grad(g . v, w) == H v, without
            # materialising the scalar g . v as an extra graph node.
            hv = torch.autograd.grad(
                live_grads,
                params,
                grad_outputs=[v[i] for i in live],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            return [h.detach() for h in hv]

        start = [_randn_like(p, generator) for p in params]
        dominant = _power_iteration(hvp, [s.clone() for s in start], max_iters, tol, progress=progress)
        if dominant.value >= 0:
            return dominant
        # Dominant eigenvalue is negative: shift the spectrum to [0, lambda_max - dominant].
        shifted = _power_iteration(hvp, start, max_iters, tol, shift=dominant.value, progress=progress)
        return TopEigenvalue(
            shifted.value + dominant.value,
            dominant.iterations + shifted.iterations,
            dominant.converged and shifted.converged,
        )



# --------------------------------------------------------------------------- #
# 5. Loss function from a dataloader
# --------------------------------------------------------------------------- #
def _forward_logits(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Logits from either an HF model (keyword ``pixel_values``, output ``.logits``)
    or a plain module / timm model (positional input, tensor output)."""
    try:
        takes_keyword = "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_keyword = False
    out = model(pixel_values=pixel_values) if takes_keyword else model(pixel_values)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):  # HF models with return_dict=False
        return out[0]
    return out


def make_loss_fn(
    dataloader: Iterable[Mapping[str, Tensor]],
    num_batches: int,
    device: str | torch.device = "cpu",
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Callable[[nn.Module], Tensor]:
    """Loss function averaging ``criterion`` (default cross-entropy) over the first
    ``num_batches`` batches (dicts with ``pixel_values`` and ``labels``).

    The batches are materialised once, here, so every call sees exactly the same
    data even if the dataloader shuffles: landscape points and Hessian-vector
    products must all describe the same function. The result is differentiable
    (no ``no_grad`` inside), so the same callable serves the Hessian; the
    landscape functions add ``no_grad`` themselves. The average is per example
    (each batch mean weighted by its size), matching the mean over all examples
    for mean-reduced criteria.
    """
    if num_batches < 1:
        raise ValueError("num_batches must be >= 1")
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    batches = []
    for batch in dataloader:
        if len(batches) >= num_batches:
            break
        batches.append((batch["pixel_values"].to(device), batch["labels"].to(device)))
    if not batches:
        raise ValueError("dataloader yielded no batches")
    total = sum(len(labels) for _, labels in batches)

    def loss_fn(model: nn.Module) -> Tensor:
        loss = 0.0
        for pixel_values, labels in batches:
            loss = loss + criterion(_forward_logits(model, pixel_values), labels) * (len(labels) / total)
        return loss

    return loss_fn
