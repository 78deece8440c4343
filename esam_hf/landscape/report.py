"""`landscape_report`: the numbers of every model (directions, slices, Hessian eigenvalue), their figures and
landscape.json in one call."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .compute import (LossFn, _as_float_tensor, _symmetric_grid, filter_normalized_direction, loss_landscape_1d,
                      loss_landscape_2d, top_hessian_eigenvalue)
from .figures import plot_landscape_1d, plot_landscape_2d


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
