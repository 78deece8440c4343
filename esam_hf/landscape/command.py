"""`esam-hf landscape`: saved models in, their landscape report out (`main`), and the options it shares
with `esam-hf reproduce --landscape` (`LandscapeOptions`).

Importing this module needs only torch: transformers and ``esam_hf.data`` are imported where they are used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .compute import _symmetric_grid, make_loss_fn
from .report import landscape_report


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
    from ..data import build_datasets, resolve_dataset

    spec = resolve_dataset(dataset)
    spec = dataclasses.replace(spec, eval_split=spec.train_split)  # the eval pipeline, on training images
    data = build_datasets(spec, data_config, train=False, max_eval_samples=samples, seed=seed)
    loader = torch.utils.data.DataLoader(data.eval_dataset, batch_size=batch_size, collate_fn=data.collator)
    return make_loss_fn(loader, num_batches=len(loader), device=device)


def _parse(argv: list[str] | None) -> LandscapeArguments:
    """Parsed and checked options; any bad one exits with a usage error before work starts."""
    from ..arguments import make_parser, parse_args
    from ..data import DataError, load_splits, resolve_dataset

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

    from ..data.errors import listed

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
