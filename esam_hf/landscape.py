"""Flatness analysis: loss-landscape slices and the top Hessian eigenvalue.

ESAM claims to find flatter minima than plain SGD. This module gives the two
standard ways of checking that claim:

* loss-landscape plots along random *filter-normalised* directions
  (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets"), which make
  slices of differently-scaled networks comparable on one axis;
* the largest eigenvalue of the loss Hessian (the usual sharpness number),
  computed matrix-free by power iteration on Hessian-vector products.

Importing this module needs only torch: tqdm (progress bars), matplotlib (plots),
transformers and ``esam_hf.data`` (the ``esam-hf landscape`` command, ``main``)
are imported inside the functions that use them.

Conventions
-----------
* A "direction" is a list of tensors aligned with ``list(model.parameters())``.
* ``loss_fn(model)`` evaluates the model on a *fixed* set of batches and returns
  a scalar (float or 0-d tensor). The landscape functions call it under
  ``torch.no_grad`` with the model in eval mode; ``top_hessian_eigenvalue``
  needs it to return a differentiable tensor. ``make_loss_fn`` builds one that
  serves both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "TopEigenvalue",
    "top_hessian_eigenvalue",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "make_loss_fn",
    "landscape_report",
    "LandscapeArguments",
    "main",
    "load_model",
    "train_subset_loss",
    "reproduce_landscape",
]

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
# 4. Plotting (matplotlib imported lazily, Agg canvas: no global backend change)
# --------------------------------------------------------------------------- #
def _new_figure(width: float, height: float):
    # Building the Figure directly with an Agg canvas renders headlessly without
    # calling matplotlib.use(), which would change the backend for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


# Axis names: "beta", "gamma" and "rho" would read as ESAM's hyper-parameters.
_AXIS_1 = "direction 1 (alpha)"
_AXIS_2 = "direction 2"
# The zoomed 1-D panel shows losses up to this multiple of the highest loss at
# the trained weights: where each model's basin walls are, not SGD's far edges.
_BASIN_HEIGHT = 2.0


def _eigenvalue_label(name: str, eigenvalue: TopEigenvalue | float | None) -> str:
    if eigenvalue is None:
        return name
    label = rf"{name}: $\lambda_{{max}}$ = {float(eigenvalue):.4g}"
    if isinstance(eigenvalue, TopEigenvalue) and not eigenvalue.converged:
        label += f" (not converged in {eigenvalue.iterations} it.)"
    return label


def _basin_window(curves: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[float, float, float, float] | None:
    """``(x_min, x_max, y_min, y_max)`` of the zoom on the basins, or None if the
    losses are not all positive (a log axis and a "multiple of the loss" need
    that) or not finite at alpha = 0.

    The height is ``_BASIN_HEIGHT`` times the highest loss at alpha = 0; the
    width spans every alpha where some model is below that height, plus one step.
    """
    finite = torch.cat([y[torch.isfinite(y)] for _, y in curves.values()])
    if finite.numel() == 0 or finite.min() <= 0:
        return None
    at_origin = max(y[x.abs().argmin()].item() for x, y in curves.values())
    y_max = _BASIN_HEIGHT * at_origin
    if not math.isfinite(y_max):  # a model diverged at its own weights: no basin to zoom on
        return None
    inside = torch.cat([x[y <= y_max] for x, y in curves.values()])
    steps = torch.cat([x.diff().abs() for x, _ in curves.values()])
    pad = steps.min().item() if steps.numel() else 0.0
    y_min = finite.min().item()
    return inside.min().item() - pad, inside.max().item() + pad, y_min - 0.05 * (y_max - y_min), y_max


def plot_landscape_1d(
    results: Mapping[str, tuple],
    path: str | os.PathLike,
    eigenvalues: Mapping[str, TopEigenvalue | float] | None = None,
    title: str = "1-D loss landscape (filter-normalised direction)",
) -> str:
    """Plot several models' 1-D slices ``{name: (alphas, losses)}``; save a PNG.

    Positive losses get two panels: the whole range on a log axis (a sharp
    model's edges can be 1000x its minimum) and a linear zoom on the basins.
    ``eigenvalues`` (``{name: top Hessian eigenvalue}``) go into the legend.
    Sharing the x-axis is meaningful because each model's direction was
    filter-normalised to its own weights, so ``alpha`` is a relative step size.
    """
    curves = {name: (_as_float_tensor(x), _as_float_tensor(y)) for name, (x, y) in results.items()}
    window = _basin_window(curves)
    fig = _new_figure(11.0 if window else 6.0, 4.2)
    axes = fig.subplots(1, 2 if window else 1, squeeze=False)[0]
    for ax in axes:
        for name, (alphas, losses) in curves.items():
            label = _eigenvalue_label(name, (eigenvalues or {}).get(name))
            ax.plot(alphas.tolist(), losses.tolist(), marker=".", label=label)
        ax.set_xlabel(_AXIS_1)
        ax.set_ylabel("loss")
        ax.locator_params(axis="x", nbins=5)  # matplotlib's default nine labels overlap at this width
        ax.grid(alpha=0.3)
    if window:
        full, zoom = axes
        full.set_yscale("log")
        full.set_title("whole range (log scale)")
        zoom.set_xlim(window[0], window[1])
        zoom.set_ylim(window[2], window[3])
        zoom.set_title(f"zoom on the basins: loss up to {_BASIN_HEIGHT:g}x that at alpha = 0")
    # Below the panels: inside, long labels (eigenvalue, "not converged") hide the basin.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(curves), 3), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def _contour_levels(lo: float, hi: float, count: int):
    """Contour levels and colour norm: log-spaced for positive losses, as Li et al.
    plot them, so the low basins get most of the colours instead of one."""
    from matplotlib.colors import LogNorm, Normalize

    if lo > 0:
        levels = torch.logspace(math.log10(lo), math.log10(hi), count, dtype=torch.float64)
        return levels.tolist(), LogNorm(lo, hi)
    return torch.linspace(lo, hi, count, dtype=torch.float64).tolist(), Normalize(lo, hi)


def plot_landscape_2d(
    results: Mapping[str, tuple],
    path: str | os.PathLike,
    levels: int = 25,
) -> str:
    """Contour plots of ``{name: (alphas_1, alphas_2, losses)}`` side by side; save a PNG.

    All panels share one set of contour levels and one colour bar, so equal
    colours mean equal loss across models (otherwise each panel would be
    auto-scaled and a sharp and a flat model could look alike).
    """
    if not results:
        raise ValueError("results is empty")
    grids = {name: tuple(torch.as_tensor(x, dtype=torch.float64) for x in r) for name, r in results.items()}
    finite = torch.cat([z[torch.isfinite(z)].flatten() for _, _, z in grids.values()])
    lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 1.0)
    if hi <= lo:  # flat surface: give contourf a non-degenerate range
        hi = lo + 1.0
    level_values, norm = _contour_levels(lo, hi, levels)

    fig = _new_figure(4.5 * len(grids) + 1.0, 4.0)
    axes = fig.subplots(1, len(grids), squeeze=False, sharey=True)[0]
    contour = None
    for ax, (name, (alphas_1, alphas_2, losses)) in zip(axes, grids.items()):
        # losses[i, j] is at (alphas_1[i], alphas_2[j]); contourf wants Z[y, x], hence the transpose.
        xy = (alphas_1.numpy(), alphas_2.numpy(), losses.T.numpy())
        contour = ax.contourf(*xy, levels=level_values, norm=norm, extend="both")
        ax.contour(*xy, levels=level_values, colors="black", linewidths=0.4, alpha=0.4)
        ax.plot([0.0], [0.0], marker="+", color="white", markersize=10)  # the trained weights
        ax.set_title(name)
        ax.set_xlabel(_AXIS_1)
    axes[0].set_ylabel(_AXIS_2)  # shared y axis: label it once
    # Ticks on the levels themselves: a log colour bar's default ticks are powers
    # of ten, and a range like 2.2 to 900 would get almost no labels.
    ticks = level_values[:: max(1, len(level_values) // 8)]
    fig.colorbar(contour, ax=list(axes), label="loss", ticks=ticks, format="%.3g")
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# 5. Loss function from a dataloader, and the one-call report
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


def landscape_report(
    models: Mapping[str, nn.Module],
    loss_fn: LossFn | Mapping[str, LossFn],
    out_dir: str | os.PathLike,
    seed: int = 0,
    alphas_1d: Iterable[float] | Tensor | None = None,
    alphas_2d: Iterable[float] | Tensor | None = None,
    hessian_max_iters: int = 100,
    hessian_tol: float = 1e-3,
    with_2d: bool = True,
    progress: bool = True,
) -> dict:
    """Compute 1-D/2-D landscapes and the top Hessian eigenvalue for each model.

    ``loss_fn`` is one callable for all models (e.g. from ``make_loss_fn``) or a
    ``{name: callable}`` mapping. Each model gets fresh generators seeded with
    ``seed``, so models with the same parameter shapes get the same raw random
    directions (then filter-normalised to their own weights): a fair comparison.
    The 1-D slice runs along direction 1; the 2-D grid uses ``alphas_2d`` on both
    axes (default 21 steps in [-1, 1]; the 1-D default is 41).

    Writes ``landscape_1d.png``, ``landscape_2d.png`` (if ``with_2d``) and
    ``landscape.json`` to ``out_dir`` and returns the JSON content as a dict:
    ``{"seed", "hessian_max_iters", "hessian_tol", "models": {name:
    {"top_hessian_eigenvalue", "hessian_iterations", "hessian_converged",
    "landscape_1d": {"alphas", "losses"}, "landscape_2d": {"alphas_1",
    "alphas_2", "losses"}}}, "files": {kind: file name in out_dir}}``, where ``losses[i][j]`` of the 2-D grid
    is at ``(alphas_1[i], alphas_2[j])``. ``progress`` shows tqdm bars.
    """
    alphas_1d = _as_float_tensor(alphas_1d if alphas_1d is not None else _symmetric_grid(41))
    alphas_2d = _as_float_tensor(alphas_2d if alphas_2d is not None else _symmetric_grid(21))
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    report: dict = {
        "seed": seed,
        "hessian_max_iters": hessian_max_iters,
        "hessian_tol": hessian_tol,
        "models": {},
        "files": {},
    }
    curves_1d, surfaces_2d, eigenvalues = {}, {}, {}
    for name, model in models.items():
        fn = loss_fn[name] if isinstance(loss_fn, Mapping) else loss_fn
        generator = torch.Generator().manual_seed(seed)
        d1 = filter_normalized_direction(model, generator)
        d2 = filter_normalized_direction(model, generator)
        entry: dict = {}

        losses_1d = loss_landscape_1d(model, fn, d1, alphas_1d, progress=f"{name}: 1-D" if progress else None)
        curves_1d[name] = (alphas_1d, losses_1d)
        entry["landscape_1d"] = {"alphas": alphas_1d.tolist(), "losses": losses_1d.tolist()}

        if with_2d:
            losses_2d = loss_landscape_2d(
                model, fn, d1, d2, alphas_2d, alphas_2d, progress=f"{name}: 2-D" if progress else None
            )
            surfaces_2d[name] = (alphas_2d, alphas_2d, losses_2d)
            entry["landscape_2d"] = {
                "alphas_1": alphas_2d.tolist(),
                "alphas_2": alphas_2d.tolist(),
                "losses": losses_2d.tolist(),
            }

        eigenvalues[name] = top_hessian_eigenvalue(
            model,
            fn,
            max_iters=hessian_max_iters,
            tol=hessian_tol,
            generator=torch.Generator().manual_seed(seed),
            progress=f"{name}: Hessian" if progress else None,
        )
        entry["top_hessian_eigenvalue"] = eigenvalues[name].value
        entry["hessian_iterations"] = eigenvalues[name].iterations
        entry["hessian_converged"] = eigenvalues[name].converged
        report["models"][name] = entry

    # File names within out_dir, not paths: the report is published with them.
    report["files"]["landscape_1d"] = os.path.basename(plot_landscape_1d(
        curves_1d, os.path.join(out_dir, "landscape_1d.png"), eigenvalues=eigenvalues
    ))
    if with_2d:
        report["files"]["landscape_2d"] = os.path.basename(
            plot_landscape_2d(surfaces_2d, os.path.join(out_dir, "landscape_2d.png")))
    json_path = os.path.join(out_dir, "landscape.json")
    report["files"]["json"] = os.path.basename(json_path)
    with open(json_path, "w") as f:
        # NaN/inf losses (diverged points) are kept as JSON's NaN/Infinity extensions.
        json.dump(report, f, indent=2, allow_nan=True)
    return report


# --------------------------------------------------------------------------- #
# 6. `esam-hf landscape`: saved models in, report out
# --------------------------------------------------------------------------- #
def _csv(text: str | None) -> list[str]:
    return [item for item in (text or "").split(",") if item]


@dataclasses.dataclass(kw_only=True)
class LandscapeOptions:
    """How the landscape is measured: shared by ``esam-hf landscape`` and ``esam-hf reproduce --landscape``."""

    samples: int = dataclasses.field(default=512, metadata={"help": "Training images in the landscape's loss subset (>= 1)."})
    hessian_max_iters: int = dataclasses.field(
        default=100,
        metadata={"help": "Cap on power iterations for the top Hessian eigenvalue (>= 1); a second run, "
                          "if the dominant eigenvalue is negative, gets the same cap."},
    )
    hessian_tol: float = dataclasses.field(
        default=1e-3,
        metadata={"help": "Power iteration stops once the eigenvalue changes by at most this fraction, in (0, 1)."},
    )
    grid: int = dataclasses.field(
        default=21,
        metadata={"help": "2-D grid points per axis over [-1, 1], odd and >= 3 so alpha = 0 is on it "
                          "(the 1-D slice gets 2*grid-1)."},
    )
    no_2d: bool = dataclasses.field(default=False, metadata={"help": "1-D slices and eigenvalues only."})

    def __post_init__(self):
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> list[str]:
        """Every invalid option, each with its allowed range (empty when all are valid)."""
        problems = [f"--{name} must be an integer >= 1, got {getattr(self, name)}"
                    for name in ("samples", "hessian_max_iters") if getattr(self, name) < 1]
        if not 0 < self.hessian_tol < 1:
            problems.append(f"--hessian_tol must be in (0, 1), got {self.hessian_tol}")
        if self.grid < 3 or self.grid % 2 == 0:
            problems.append(
                "--grid must be an odd integer >= 3 (so the trained weights, alpha = 0, are its middle point), "
                f"got {self.grid}"
            )
        return problems

    def landscape_argv(self) -> list[str]:
        """These options as ``esam-hf landscape`` flags."""
        return [f"--{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(LandscapeOptions)]


@dataclasses.dataclass(kw_only=True)
class LandscapeArguments(LandscapeOptions):
    """Options of ``esam-hf landscape``. List options are comma-separated strings
    (``--models runs/sgd,runs/esam``), as in ``esam-hf reproduce --methods``."""

    models: str = dataclasses.field(
        metadata={"help": "Comma-separated saved model folders (each holding config.json), e.g. runs/sgd,runs/esam."}
    )
    names: str | None = dataclasses.field(
        default=None, metadata={"help": "Comma-separated labels, one distinct per model (default: the folder names)."}
    )
    dataset: str = dataclasses.field(
        metadata={"help": "Dataset name or path; a fixed, un-augmented subset of its training split is the loss."}
    )
    batch_size: int = dataclasses.field(default=128, metadata={"help": "Images per forward pass (>= 1)."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the random directions and of the subset."})
    output_dir: str = dataclasses.field(metadata={"help": "Folder for landscape_1d.png, landscape_2d.png and landscape.json."})

    @property
    def model_paths(self) -> list[str]:
        return _csv(self.models)

    @property
    def model_names(self) -> list[str]:
        return _csv(self.names) or [os.path.basename(os.path.normpath(p)) for p in self.model_paths]

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.batch_size < 1:
            problems.append(f"--batch_size must be an integer >= 1, got {self.batch_size}")
        if not self.model_paths:
            problems.append("--models must name at least one saved model folder")
        problems += [
            f"--models: {path!r} is not a saved model folder (no config.json in it)"
            for path in self.model_paths
            if not os.path.isfile(os.path.join(path, "config.json"))
        ]
        names = self.model_names
        if len(names) != len(self.model_paths) or len(set(names)) != len(names):
            problems.append(
                f"--names must give one distinct name per model ({len(self.model_paths)} models), got {names}"
            )
        if os.path.isfile(self.output_dir):
            problems.append(f"--output_dir must be a folder, but {self.output_dir!r} is a file")
        return problems


def load_model(path: str, device: str | torch.device = "cpu") -> nn.Module:
    """A saved model folder, in eval mode."""
    import esam_hf.models  # noqa: F401  (registers the CIFAR backbones a saved CIFAR model needs)
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path).to(device).eval()


def train_subset_loss(dataset: str, data_config: dict, samples: int, batch_size: int, device, seed: int = 0):
    """Loss function on a fixed `samples`-image subset of the training split, preprocessed as for
    evaluation (no augmentation), so every landscape point sees exactly the same inputs."""
    from .data import build_datasets, resolve_dataset

    spec = resolve_dataset(dataset)
    spec = dataclasses.replace(spec, eval_split=spec.train_split)  # the eval pipeline, on training images
    data = build_datasets(spec, data_config, train=False, max_eval_samples=samples, seed=seed)
    loader = torch.utils.data.DataLoader(data.eval_dataset, batch_size=batch_size, collate_fn=data.collator)
    return make_loss_fn(loader, num_batches=len(loader), device=device)


def _parse(argv: list[str] | None) -> LandscapeArguments:
    """Parsed and checked options; any bad one exits with a usage error before work starts."""
    from .arguments import make_parser, parse_args
    from .data import DataError, load_splits, resolve_dataset

    parser = make_parser(
        [LandscapeArguments],
        prog="esam-hf landscape",
        description="1-D/2-D loss landscapes and the top Hessian eigenvalue of saved models, "
        "on a fixed subset of the training split.",
    )
    try:
        (args,) = parse_args(parser, argv)
    except ValueError as error:  # LandscapeArguments' own checks
        parser.error(str(error))
    try:
        spec = resolve_dataset(args.dataset)  # built-in names cost nothing; a path is opened once
        # The classes of the training split, which the landscape's loss subset is drawn from.
        class_names = load_splits(dataclasses.replace(spec, eval_split=None, train_val_split=0.0), max_train_samples=1)[2]
    except DataError as error:
        parser.error(f"--dataset: {error}")
    for path in args.model_paths:
        problem = class_mismatch(path, class_names)
        if problem:
            parser.error(f"--models {path}: {problem}")
    return args


def class_mismatch(model_path: str, class_names: Sequence[str]) -> str | None:
    """Why the saved model in `model_path` cannot be scored on data whose classes are `class_names` (its
    config's `id2label` names other classes, or the same in another order), or None. A config without
    names, or with transformers' LABEL_0.. placeholders, is checked by its number of classes only."""
    import esam_hf.models  # noqa: F401  (registers the CIFAR backbones a saved CIFAR config names)
    from transformers import AutoConfig

    from .data.errors import listed

    try:  # the config as the model loads it (timm models store `label_names`, not `id2label`)
        id2label = AutoConfig.from_pretrained(model_path).id2label
    except Exception:  # an unreadable config: loading the model says why
        return None
    if not id2label:
        return None
    labels = [id2label.get(i) for i in range(len(id2label))]
    placeholders = labels == [f"LABEL_{i}" for i in range(len(labels))]
    if len(labels) == len(class_names) and (placeholders or labels == list(class_names)):
        return None
    return (f"the model's classes (id2label in its config.json) are {listed([repr(n) for n in labels])}, but "
            f"--dataset's are {listed([repr(n) for n in class_names])}: every loss would score images against the "
            "wrong class. Use the dataset the model was trained on.")


def _loss_fns(models: Mapping[str, nn.Module], args: LandscapeArguments, device) -> dict[str, Callable]:
    """One training-subset loss per model; models sharing a data config share it."""
    loss_fns, by_config = {}, {}
    for name, model in models.items():
        config = dict(model.config.pretrained_cfg)
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in by_config:
            by_config[key] = train_subset_loss(args.dataset, config, args.samples, args.batch_size, device, args.seed)
        loss_fns[name] = by_config[key]
    return loss_fns


def _print_table(report: dict, out: str) -> None:
    print("| model | top Hessian eigenvalue | power iterations | converged | train-subset loss |")
    print("|---|---|---|---|---|")
    for name, entry in report["models"].items():
        losses = entry["landscape_1d"]["losses"]
        print(
            f"| {name} | {entry['top_hessian_eigenvalue']:.4g} | {entry['hessian_iterations']} | "
            f"{'yes' if entry['hessian_converged'] else 'no'} | {losses[len(losses) // 2]:.4f} |"
        )
    if not all(entry["hessian_converged"] for entry in report["models"].values()):
        print(f"\n[landscape] some eigenvalues did not converge to --hessian_tol {report['hessian_tol']:g} "
              f"within --hessian_max_iters {report['hessian_max_iters']}: raise that cap")
    print(f"\n[landscape] {', '.join(os.path.basename(p) for p in report['files'].values())} in {out}")


def main(argv: list[str] | None = None) -> dict:
    """`esam-hf landscape`: compare saved models; prints their top Hessian eigenvalues. Returns the report."""
    args = _parse(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {name: load_model(path, device) for name, path in zip(args.model_names, args.model_paths)}
    report = landscape_report(
        models,
        _loss_fns(models, args, device),
        args.output_dir,
        seed=args.seed,
        alphas_1d=_symmetric_grid(2 * args.grid - 1),
        alphas_2d=_symmetric_grid(args.grid),
        hessian_max_iters=args.hessian_max_iters,
        hessian_tol=args.hessian_tol,
        with_2d=not args.no_2d,
    )
    _print_table(report, args.output_dir)
    return report


def reproduce_landscape(output_dir: str, methods: list[str], dataset: str, seed: int = 0,
                        options: LandscapeOptions | None = None) -> dict:
    """`main` on one model per method of a `reproduce` output folder, into output_dir/landscape."""
    from .reproduce import run_dir

    return main(["--models", ",".join(run_dir(output_dir, m, seed) for m in methods),
                 "--names", ",".join(methods), "--dataset", dataset,
                 "--output_dir", os.path.join(output_dir, "landscape"), *(options or LandscapeOptions()).landscape_argv()])
