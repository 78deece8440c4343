"""Flatness analysis: loss-landscape slices and the top Hessian eigenvalue.

ESAM claims to find flatter minima than plain SGD. This package gives the two
standard ways of checking that claim:

* loss-landscape plots along random *filter-normalised* directions
  (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets"), which make
  slices of differently-scaled networks comparable on one axis;
* the largest eigenvalue of the loss Hessian (the usual sharpness number),
  computed matrix-free by power iteration on Hessian-vector products.

The package keeps the computation apart from what shows it: ``compute`` (directions, slices, the
Hessian eigenvalue, the loss function), ``figures`` (the plots), ``report`` (``landscape_report``: all of it
for several models, with ``landscape.json``) and ``command`` (``esam-hf landscape``).

Importing it needs only torch: tqdm (progress bars), matplotlib (plots),
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

from .command import LandscapeArguments, LandscapeOptions, class_mismatch, load_model, main, train_subset_loss
from .compute import (TopEigenvalue, filter_normalized_direction, loss_landscape_1d, loss_landscape_2d, make_loss_fn,
                      top_hessian_eigenvalue)
from .figures import plot_landscape_1d, plot_landscape_2d
from .report import landscape_report

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
    "LandscapeOptions",
    "class_mismatch",
]
