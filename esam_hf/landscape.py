"""Flatness analysis: loss-landscape slices and the top Hessian eigenvalue.

ESAM claims to find flatter minima than plain SGD. This module gives the two
standard ways of checking that claim:

* loss-landscape plots along random *filter-normalised* directions
  (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets"), which make
  slices of differently-scaled networks comparable on one axis;
* the largest eigenvalue of the loss Hessian (the usual sharpness number),
  computed matrix-free by power iteration on Hessian-vector products.

Only torch is needed; matplotlib is imported inside the plotting functions, so
importing this module never requires it.

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
import inspect
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "top_hessian_eigenvalue",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "make_loss_fn",
    "landscape_report",
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
    coordinates: Iterable[Sequence[float]],
) -> list[float]:
    """Loss at ``w + sum_k c_k * d_k`` for every coordinate tuple ``c``."""
    params = list(model.parameters())
    directions = [_check_direction(params, d, f"direction {k}") for k, d in enumerate(directions)]
    losses = []
    with _eval_mode(model), torch.no_grad(), _weights_restored(params) as saved:
        for coords in coordinates:
            # Always start from the saved weights so rounding errors from one grid
            # point never leak into the next.
            torch._foreach_copy_(params, saved)
            for coeff, direction in zip(coords, directions):
                if coeff != 0.0:
                    torch._foreach_add_(params, direction, alpha=float(coeff))
            losses.append(float(loss_fn(model)))
    return losses


def loss_landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    direction: Sequence[Tensor],
    alphas: Iterable[float] | Tensor,
) -> Tensor:
    """Losses ``L(w + a*d)`` for each ``a`` in ``alphas`` (float64 tensor, same length).

    The model is evaluated in eval mode under ``no_grad``; weights and the
    train/eval flags are restored bit-exactly afterwards, also if ``loss_fn`` raises.
    """
    alphas = _as_float_tensor(alphas)
    losses = _evaluate_on_grid(model, loss_fn, [direction], [(a,) for a in alphas.tolist()])
    return torch.tensor(losses, dtype=torch.float64)


def loss_landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    d1: Sequence[Tensor],
    d2: Sequence[Tensor],
    alphas: Iterable[float] | Tensor,
    betas: Iterable[float] | Tensor,
) -> Tensor:
    """Losses ``L(w + a*d1 + b*d2)`` as a float64 tensor of shape ``(len(alphas), len(betas))``.

    ``losses[i, j]`` belongs to ``(alphas[i], betas[j])``. The two random
    directions are not orthogonalised: in high dimension independent Gaussian
    directions are nearly orthogonal already (as argued by Li et al.).
    """
    alphas, betas = _as_float_tensor(alphas), _as_float_tensor(betas)
    grid = [(a, b) for a in alphas.tolist() for b in betas.tolist()]
    losses = _evaluate_on_grid(model, loss_fn, [d1, d2], grid)
    return torch.tensor(losses, dtype=torch.float64).reshape(len(alphas), len(betas))


# --------------------------------------------------------------------------- #
# 3. Top Hessian eigenvalue
# --------------------------------------------------------------------------- #
def _power_iteration(
    hvp: Callable[[list[Tensor]], list[Tensor]],
    start: list[Tensor],
    iters: int,
    tol: float,
    shift: float = 0.0,
) -> float:
    """Dominant eigenvalue of ``H - shift*I`` by power iteration.

    Uses the Rayleigh quotient ``v^T (H - shift I) v`` of the unit iterate as
    the estimate and stops once its relative change drops below ``tol``.
    """
    v = start
    torch._foreach_div_(v, _norm(v))
    estimate = None
    for _ in range(iters):
        hv = hvp(v)
        if shift != 0.0:
            torch._foreach_add_(hv, v, alpha=-shift)
        new_estimate = _dot(v, hv).item()
        hv_norm = _norm(hv)
        if hv_norm.item() == 0.0:  # v is in the null space: eigenvalue 0
            return new_estimate
        v = torch._foreach_div(hv, hv_norm)
        if estimate is not None and abs(new_estimate - estimate) <= tol * max(abs(estimate), 1e-12):
            return new_estimate
        estimate = new_estimate
    return estimate


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    iters: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> float:
    """Largest eigenvalue of the Hessian of ``loss_fn(model)`` w.r.t. the trainable parameters.

    Matrix-free: the loss and its gradient (with ``create_graph=True``) are built
    once, and each power-iteration step is one extra backward through that graph,
    ``Hv = d(g . v)/dw``. The model is put in eval mode for the duration so that
    dropout/BN randomness does not make the operator change between iterations
    (the same convention as the landscape functions).

    Power iteration finds the eigenvalue of largest *magnitude*. Near a minimum
    that is the largest positive one; if it comes out negative, a second run on
    ``H - lambda_neg * I`` (whose spectrum is then non-negative) recovers the
    algebraically largest eigenvalue.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
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
            return 0.0
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
        dominant = _power_iteration(hvp, [s.clone() for s in start], iters, tol)
        if dominant >= 0:
            return float(dominant)
        # Dominant eigenvalue is negative: shift the spectrum to [0, lambda_max - dominant].
        shifted = _power_iteration(hvp, start, iters, tol, shift=dominant)
        return float(shifted + dominant)


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


def plot_landscape_1d(
    results: Mapping[str, tuple],
    path: str | os.PathLike,
    title: str = "1-D loss landscape (filter-normalised direction)",
    logy: bool = False,
) -> str:
    """Plot several models' 1-D slices ``{name: (alphas, losses)}`` on one axes; save a PNG.

    Sharing the x-axis is meaningful because each model's direction was
    filter-normalised to its own weights, so ``alpha`` is a relative step size.
    """
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, (alphas, losses) in results.items():
        ax.plot(_as_float_tensor(alphas).tolist(), _as_float_tensor(losses).tolist(), marker=".", label=name)
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_landscape_2d(
    results: Mapping[str, tuple],
    path: str | os.PathLike,
    levels: int = 20,
) -> str:
    """Contour plots of ``{name: (alphas, betas, losses)}`` side by side; save a PNG.

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
    level_values = torch.linspace(lo, hi, levels).tolist()

    fig = _new_figure(4.5 * len(grids) + 1.0, 4.0)
    axes = fig.subplots(1, len(grids), squeeze=False, sharey=True)[0]
    contour = None
    for ax, (name, (alphas, betas, losses)) in zip(axes, grids.items()):
        # losses[i, j] is at (alphas[i], betas[j]); contourf wants Z[y, x], hence the transpose.
        contour = ax.contourf(
            alphas.numpy(), betas.numpy(), losses.T.numpy(), levels=level_values, vmin=lo, vmax=hi, extend="both"
        )
        ax.plot([0.0], [0.0], marker="+", color="white")  # the trained weights
        ax.set_title(name)
        ax.set_xlabel("alpha")
    axes[0].set_ylabel("beta")  # shared y axis: label it once
    fig.colorbar(contour, ax=list(axes), label="loss")
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
    betas_2d: Iterable[float] | Tensor | None = None,
    hessian_iters: int = 20,
    hessian_tol: float = 1e-3,
    with_2d: bool = True,
) -> dict:
    """Compute 1-D/2-D landscapes and the top Hessian eigenvalue for each model.

    ``loss_fn`` is one callable for all models (e.g. from ``make_loss_fn``) or a
    ``{name: callable}`` mapping. Each model gets fresh generators seeded with
    ``seed``, so models with the same parameter shapes get the same raw random
    directions (then filter-normalised to their own weights): a fair comparison.

    Writes ``landscape_1d.png``, ``landscape_2d.png`` (if ``with_2d``) and
    ``landscape.json`` to ``out_dir`` and returns the JSON content as a dict:
    ``{"seed", "models": {name: {"top_hessian_eigenvalue", "landscape_1d":
    {"alphas", "losses"}, "landscape_2d": {"alphas", "betas", "losses"}}}, "files"}``.
    """
    alphas_1d = _as_float_tensor(alphas_1d if alphas_1d is not None else torch.linspace(-1.0, 1.0, 41))
    alphas_2d = _as_float_tensor(alphas_2d if alphas_2d is not None else torch.linspace(-1.0, 1.0, 21))
    betas_2d = _as_float_tensor(betas_2d if betas_2d is not None else alphas_2d)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    report: dict = {"seed": seed, "models": {}, "files": {}}
    curves_1d, surfaces_2d = {}, {}
    for name, model in models.items():
        fn = loss_fn[name] if isinstance(loss_fn, Mapping) else loss_fn
        generator = torch.Generator().manual_seed(seed)
        d1 = filter_normalized_direction(model, generator)
        d2 = filter_normalized_direction(model, generator)
        entry: dict = {}

        losses_1d = loss_landscape_1d(model, fn, d1, alphas_1d)
        curves_1d[name] = (alphas_1d, losses_1d)
        entry["landscape_1d"] = {"alphas": alphas_1d.tolist(), "losses": losses_1d.tolist()}

        if with_2d:
            losses_2d = loss_landscape_2d(model, fn, d1, d2, alphas_2d, betas_2d)
            surfaces_2d[name] = (alphas_2d, betas_2d, losses_2d)
            entry["landscape_2d"] = {
                "alphas": alphas_2d.tolist(),
                "betas": betas_2d.tolist(),
                "losses": losses_2d.tolist(),
            }

        entry["top_hessian_eigenvalue"] = top_hessian_eigenvalue(
            model, fn, iters=hessian_iters, tol=hessian_tol, generator=torch.Generator().manual_seed(seed)
        )
        report["models"][name] = entry

    report["files"]["landscape_1d"] = plot_landscape_1d(curves_1d, os.path.join(out_dir, "landscape_1d.png"))
    if with_2d:
        report["files"]["landscape_2d"] = plot_landscape_2d(surfaces_2d, os.path.join(out_dir, "landscape_2d.png"))
    json_path = os.path.join(out_dir, "landscape.json")
    report["files"]["json"] = json_path
    with open(json_path, "w") as f:
        # NaN/inf losses (diverged points) are kept as JSON's NaN/Infinity extensions.
        json.dump(report, f, indent=2, allow_nan=True)
    return report
