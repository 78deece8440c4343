"""Figures without a display: the matplotlib plumbing the landscape and `esam-hf reproduce` figures share.

matplotlib is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os


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
