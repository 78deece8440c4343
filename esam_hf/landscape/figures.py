"""The landscape figures: 1-D slices of several models on one axis, and their 2-D grids side by side."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from ..plots import _new_figure, _save
from .compute import TopEigenvalue, _as_float_tensor



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
