"""`esam-hf reproduce` and `esam-hf landscape`: the paper's comparison of SGD, SAM and ESAM.

`reproduce` trains every method x seed with one recipe (same schedule, same seeds) into
DIR/<method>-seed<seed>/, each a reloadable model folder with its card. Runs resume: a finished
run (all_results.json) is skipped, a cut-off one continues from its last checkpoint. Every run
logs per epoch its test accuracy, train loss and cumulative training seconds (evaluation and
checkpointing excluded) to timeline.json; the runs are then summarised in DIR/results.md,
DIR/results.json and plots.

`landscape` compares saved models' loss landscapes and top Hessian eigenvalues on a fixed,
un-augmented subset of the training split (the loss that training minimised).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
from transformers import HfArgumentParser, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .cli import recipe_defaults
from .recipes import RECIPES, get_recipe
from .run import DataArguments, ModelArguments, train_image_classifier
from .trainer import ESAMTrainingArguments

# method -> (recipe optimizer, extra ESAMTrainingArguments). `esam_warmup` is ESAM whose SDS
# fraction starts at the whole batch and reaches gamma after 30% of training; `esam_random`
# selects a uniform random subset instead of the sharpest examples.
METHODS = {
    "sgd": ("sgd", {}),
    "sam": ("sam", {}),
    "esam": ("esam", {}),
    "esam_warmup": ("esam", {"esam_gamma_warmup": 0.3}),
    "esam_random": ("esam", {"esam_selection": "random"}),
}
# Fields that make a method what it is: re-imposed after pass-through flags, so `--esam_rho 0.1`
# changes SAM and ESAM but leaves SGD plain SGD (and `--esam_gamma 0.3` leaves SAM SAM).
_DEFINING = {"sgd": ("esam_rho",), "sam": ("esam_beta", "esam_gamma"), "esam": ()}
TIMELINE = "timeline.json"
FINAL_RESULTS = "all_results.json"  # written last, so present only once a run has finished
_EVAL_KEYS = ("eval_accuracy", "eval_top5_accuracy", "eval_loss")


# --------------------------------------------------------------------------- #
# Planning the runs
# --------------------------------------------------------------------------- #
def batch_schedule(recipe_name: str, batch_size: int | None) -> tuple[int, float, float]:
    """(global batch, learning rate, warm-up fraction) for training `recipe_name` at `batch_size`.

    The linear scaling rule (Goyal et al., 2017) keeps the per-example step size of the recipe;
    a larger batch also gets a 5% linear warm-up, since the scaled-up rate is unstable at init."""
    recipe = get_recipe(recipe_name)
    batch = batch_size or recipe.batch_size
    if batch == recipe.batch_size:
        return batch, recipe.learning_rate, 0.0
    return batch, recipe.learning_rate * batch / recipe.batch_size, 0.05 if batch > recipe.batch_size else 0.0


def run_dir(output_dir: str, method: str, seed: int) -> str:
    return os.path.join(output_dir, f"{method}-seed{seed}")


def _warmup_fraction(fraction: float) -> dict:
    # transformers >= 5.2x reads a float warmup_steps < 1 as a fraction and dropped warmup_ratio;
    # earlier releases have warmup_ratio.
    fields = {f.name for f in dataclasses.fields(ESAMTrainingArguments)}
    return {"warmup_ratio": fraction} if "warmup_ratio" in fields else {"warmup_steps": fraction}


def plan_run(opts: argparse.Namespace, method: str, seed: int, passthrough: list[str]):
    """Model, data and training arguments of one run: the recipe's defaults, this command's
    options, then the pass-through flags, parsed as `esam-hf train` parses them."""
    optimizer, extra = METHODS[method]
    batch, lr, warmup = batch_schedule(opts.recipe, opts.batch_size)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    defaults = {**recipe_defaults(opts.recipe, optimizer), **extra,
                "output_dir": run_dir(opts.output_dir, method, seed), "seed": seed,
                "per_device_train_batch_size": max(1, batch // world_size), "learning_rate": lr, **_warmup_fraction(warmup),
                "dataloader_pin_memory": torch.cuda.is_available()}
    options = {"num_train_epochs": opts.epochs, "dataset": opts.dataset, "max_train_samples": opts.max_train_samples,
               "max_eval_samples": opts.max_eval_samples, "dataloader_num_workers": opts.workers,
               "bf16": opts.bf16 or None, "channels_last": opts.channels_last or None}
    defaults.update({k: v for k, v in options.items() if v is not None})
    esam = get_recipe(opts.recipe).esam_args(optimizer)
    defining = [f"--{k}={esam[k]}" for k in _DEFINING[optimizer]]
    parser = HfArgumentParser((ModelArguments, DataArguments, ESAMTrainingArguments), prog="esam-hf reproduce")
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(passthrough + defining)


# --------------------------------------------------------------------------- #
# Training, with a per-epoch timeline
# --------------------------------------------------------------------------- #
def _clock() -> float:
    if torch.cuda.is_available():  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()
    return time.perf_counter()


def _read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


class TimelineCallback(TrainerCallback):
    """Writes `timeline.json`: per epoch the step, cumulative training seconds, mean train loss and
    eval metrics. The clock runs from each epoch's start to its end, so evaluation and checkpoints
    are not counted. On resume, entries after the checkpoint's step are dropped (that work is redone)
    and the clock continues from the last entry kept."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        saved = _read_json(self.path, {}).get("epochs", [])
        self.epochs = [e for e in saved if e["step"] <= state.global_step]  # state is the checkpoint's by now
        self.seconds = self.epochs[-1]["train_seconds"] if self.epochs else 0.0
        self.train_samples = len(train_dataloader.dataset) if train_dataloader is not None else None
        self.last_logged = state.global_step

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.loss_sum, self.loss_steps = 0.0, 0
        self.start = _clock()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds += _clock() - self.start
        self.epochs.append({"epoch": round(state.epoch, 4), "step": state.global_step, "train_seconds": self.seconds})
        control.should_log = True  # a loss log at every epoch end, so no log spans two epochs
        self._fill_loss(args, state)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # the mean loss of the steps since the previous log
            steps = state.global_step - self.last_logged
            self.loss_sum, self.loss_steps = self.loss_sum + logs["loss"] * steps, self.loss_steps + steps
            self.last_logged = state.global_step
            self._fill_loss(args, state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        entry = self.epochs[-1] if self.epochs else None
        if entry and entry["step"] == state.global_step and "eval_accuracy" not in entry:
            entry.update({k: v for k, v in (metrics or {}).items() if k in _EVAL_KEYS})
            self._write(args, state)

    def _fill_loss(self, args, state):
        # The epoch's loss is complete once every step up to its end has been logged.
        entry = self.epochs[-1] if self.epochs else None
        if entry and entry["step"] == self.last_logged == state.global_step and self.loss_steps:
            entry["train_loss"] = self.loss_sum / self.loss_steps
        self._write(args, state)

    def _write(self, args, state):
        if state.is_world_process_zero:
            with open(self.path, "w") as f:
                json.dump({"train_samples": self.train_samples, "epochs": self.epochs}, f, indent=2)


def train_run(model_args, data_args, training_args, recipe: str) -> str:
    """Train one run unless it has finished; continue it from its last checkpoint if it was cut off.
    Returns what it did: "skip", "resume" or "train"."""
    out, name = training_args.output_dir, os.path.basename(os.path.normpath(training_args.output_dir))
    if os.path.isfile(os.path.join(out, FINAL_RESULTS)):
        print(f"[reproduce] {name}: skip (finished: {FINAL_RESULTS} exists)", flush=True)
        return "skip"
    checkpoint = get_last_checkpoint(out) if os.path.isdir(out) else None
    print(f"[reproduce] {name}: " + (f"resume from {os.path.basename(checkpoint)}" if checkpoint else "train"), flush=True)
    train_image_classifier(model_args, data_args, training_args, recipe=recipe, resume_from_checkpoint=checkpoint,
                           callbacks=[TimelineCallback(os.path.join(out, TIMELINE))])
    return "resume" if checkpoint else "train"


# --------------------------------------------------------------------------- #
# Summary: table, JSON, plots
# --------------------------------------------------------------------------- #
def load_run(path: str) -> dict:
    """A finished run's final accuracy, training seconds, images/s and timeline."""
    final = _read_json(os.path.join(path, FINAL_RESULTS))
    timeline = _read_json(os.path.join(path, TIMELINE), {"epochs": []})
    epochs = timeline["epochs"]
    if epochs and timeline.get("train_samples"):
        seconds = epochs[-1]["train_seconds"]
        images_per_s = timeline["train_samples"] * epochs[-1]["epoch"] / seconds
    else:  # no timeline: the Trainer's own numbers (which include evaluation time)
        seconds, images_per_s = final.get("train_runtime"), final.get("train_samples_per_second")
    return {"accuracy": final.get("eval_accuracy"), "top5_accuracy": final.get("eval_top5_accuracy"),
            "train_seconds": seconds, "images_per_s": images_per_s, "timeline": epochs}


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per method: top-1 mean, std and range over seeds, mean training seconds, images/s and its ratio to SGD."""
    summary = {}
    for method, by_seed in runs.items():
        acc = [r["accuracy"] for r in by_seed.values()]
        summary[method] = {
            "seeds": list(by_seed), "top1_mean": statistics.fmean(acc),
            "top1_std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "top1_min": min(acc), "top1_max": max(acc),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in by_seed.values()),
            "images_per_s": statistics.fmean(r["images_per_s"] for r in by_seed.values()),
        }
    sgd = summary.get("sgd", {}).get("images_per_s")
    for s in summary.values():
        s["images_per_s_vs_sgd"] = s["images_per_s"] / sgd if sgd else None
    return summary


def markdown(summary: dict[str, dict], header: str) -> str:
    lines = [header, "", "| method | seeds | top-1 mean ± std | top-1 min–max | train s | images/s | images/s vs SGD |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        ratio = f"{s['images_per_s_vs_sgd']:.2f}" if s["images_per_s_vs_sgd"] else "n/a"
        lines.append(f"| {method} | {len(s['seeds'])} | {100 * s['top1_mean']:.2f} ± {100 * s['top1_std']:.2f} | "
                     f"{100 * s['top1_min']:.2f}–{100 * s['top1_max']:.2f} | {s['train_seconds']:.1f} | "
                     f"{s['images_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def _mean_curve(timelines: list[list[dict]], x: str, y: str) -> tuple[list[float], list[float]]:
    """Mean over seeds, epoch by epoch, of the epochs every seed has."""
    rows = [[e for e in t if y in e] for t in timelines]
    n = min(map(len, rows), default=0)
    return ([statistics.fmean(r[i][x] for r in rows) for i in range(n)],
            [statistics.fmean(r[i][y] for r in rows) for i in range(n)])


def plot_curves(runs: dict[str, dict[int, dict]], out_dir: str) -> list[str]:
    """Test accuracy vs epoch and vs training seconds, and train loss vs epoch: one line per method."""
    from .landscape import _new_figure, _save

    paths = []
    for x, y, file, xlabel, ylabel in [
        ("epoch", "eval_accuracy", "accuracy_vs_epoch.png", "epoch", "test top-1"),
        ("train_seconds", "eval_accuracy", "accuracy_vs_time.png", "training wall-clock (s)", "test top-1"),
        ("epoch", "train_loss", "train_loss.png", "epoch", "train loss"),
    ]:
        fig = _new_figure(5.5, 3.8)
        ax = fig.add_subplot(1, 1, 1)
        for method, by_seed in runs.items():
            ax.plot(*_mean_curve([r["timeline"] for r in by_seed.values()], x, y), marker="o", label=method)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel}, mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, os.path.join(out_dir, file)))
    return paths


# --------------------------------------------------------------------------- #
# `esam-hf reproduce`
# --------------------------------------------------------------------------- #
def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="esam-hf reproduce", allow_abbrev=False,  # no prefix matching: `--seed` must not become `--seeds`
        description="Train SGD, SAM and ESAM on one recipe over several seeds; tables and plots.",
        epilog="Any other flag (ESAMTrainingArguments, model or data field, e.g. --esam_gamma_warmup 0.3 or "
               "--model_kwargs '{\"drop_rate\": 0.1}') is passed to every run.")
    parser.add_argument("--recipe", default="cifar10-resnet18", choices=list(RECIPES), metavar="NAME",
                        help="a recipe of `esam-hf recipes` (default cifar10-resnet18)")
    parser.add_argument("--epochs", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0], help="e.g. 0,1,2")
    parser.add_argument("--methods", type=_csv, default=["sgd", "sam", "esam"], help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--dataset", default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch; other than the recipe's, the lr scales linearly (and warms up if larger)")
    parser.add_argument("--output-dir", default=None, help="default: outputs/reproduce-<recipe>")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers per run")
    parser.add_argument("--landscape", action="store_true",
                        help="then compare the seed-0 (first seed) models' landscapes into DIR/landscape (default settings)")
    opts, passthrough = parser.parse_known_args(argv)
    unknown = set(opts.methods) - set(METHODS)
    if unknown or not opts.methods:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    opts.output_dir = opts.output_dir or os.path.join("outputs", f"reproduce-{opts.recipe}")
    return opts, passthrough


def main(argv: list[str] | None = None) -> dict:
    """Train every method x seed, then write and print the summary. Returns the results.json content."""
    opts, passthrough = parse_args(argv)
    recipe = get_recipe(opts.recipe)
    batch, lr, warmup = batch_schedule(opts.recipe, opts.batch_size)
    if batch != recipe.batch_size:
        warm = f", with a linear warm-up over the first {warmup:.0%} of steps" if warmup else ""
        print(f"[reproduce] batch {batch} instead of the recipe's {recipe.batch_size}: "
              f"learning rate scaled linearly {recipe.learning_rate:g} -> {lr:g}{warm}")
    # Parse every run's arguments first, so a bad flag fails before hours of training.
    plans = {(m, s): plan_run(opts, m, s, passthrough) for m in opts.methods for s in opts.seeds}
    for (method, seed), (model_args, data_args, training_args) in plans.items():
        train_run(model_args, data_args, training_args, recipe=f"{opts.recipe} ({method})")
    if not training_args.should_save:  # under DDP only the main process summarises
        return {}
    results = write_results(opts, *next(iter(plans.values())))
    if opts.landscape:
        results["landscape"] = reproduce_landscape(opts.output_dir, opts.methods, results["dataset"], seed=opts.seeds[0])
    return results


def write_results(opts: argparse.Namespace, model_args, data_args, training_args) -> dict:
    """results.md (printed too), results.json and the plots, from the finished runs' folders."""
    from .benchmark import environment

    runs = {m: {s: load_run(run_dir(opts.output_dir, m, s)) for s in opts.seeds} for m in opts.methods}
    summary, env = summarize(runs), environment()
    batch, lr, warmup = batch_schedule(opts.recipe, opts.batch_size)
    header = (f"Recipe {opts.recipe}: {model_args.model_name} on {data_args.dataset}, "
              f"{training_args.num_train_epochs:g} epochs, batch {batch}, lr {lr:g}"
              + (f" (warm-up {warmup:.0%})" if warmup else "")
              + f", seeds {','.join(map(str, opts.seeds))}. Device: {env['device']}. Training seconds exclude evaluation.")
    plots = [os.path.basename(p) for p in plot_curves(runs, opts.output_dir)]
    table = markdown(summary, header)
    with open(os.path.join(opts.output_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    results = {"recipe": opts.recipe, "model": model_args.model_name, "dataset": data_args.dataset,
               "epochs": training_args.num_train_epochs, "batch_size": batch, "learning_rate": lr, "warmup": warmup,
               "seeds": opts.seeds, "environment": env, "methods": summary, "plots": plots,
               "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()}}
    with open(os.path.join(opts.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table)
    print(f"\n[reproduce] results.md, results.json and plots in {opts.output_dir}")
    return results


# --------------------------------------------------------------------------- #
# `esam-hf landscape`
# --------------------------------------------------------------------------- #
def load_model(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A saved model folder, in eval mode (the esam_hf import registers its CIFAR backbones)."""
    import esam_hf  # noqa: F401
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path).to(device).eval()


def train_subset_loss(dataset: str, data_config: dict, samples: int, batch_size: int, device, seed: int = 0):
    """Loss function on a fixed `samples`-image subset of the training split, preprocessed as for
    evaluation (no augmentation), so every landscape point sees exactly the same inputs."""
    from .data import build_datasets, resolve_dataset
    from .landscape import make_loss_fn

    spec = resolve_dataset(dataset)
    spec = dataclasses.replace(spec, eval_split=spec.train_split)  # the eval pipeline, on training images
    data = build_datasets(spec, data_config, train=False, max_eval_samples=samples, seed=seed)
    loader = torch.utils.data.DataLoader(data.eval_dataset, batch_size=batch_size, collate_fn=data.collator)
    return make_loss_fn(loader, num_batches=len(loader), device=device)


def landscape_main(argv: list[str] | None = None) -> dict:
    """Landscape comparison of saved models; prints their top Hessian eigenvalues. Returns the report."""
    from .landscape import landscape_report

    parser = argparse.ArgumentParser(prog="esam-hf landscape", allow_abbrev=False,
                                     description="1-D/2-D loss landscapes and top Hessian eigenvalue of saved models.")
    parser.add_argument("--models", type=_csv, required=True, help="comma-separated saved model folders")
    parser.add_argument("--names", type=_csv, default=None, help="comma-separated labels (default: folder names)")
    parser.add_argument("--dataset", required=True, help="dataset name or path; its training split is used")
    parser.add_argument("--samples", type=int, default=512, help="training images in the fixed loss subset")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hessian-iters", type=int, default=20)
    parser.add_argument("--grid", type=int, default=21, help="2-D grid points per axis (the 1-D slice gets 2*grid-1)")
    parser.add_argument("--no-2d", action="store_true", help="1-D slices and eigenvalues only")
    parser.add_argument("--seed", type=int, default=0, help="directions and subset")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    names = args.names or [os.path.basename(os.path.normpath(p)) for p in args.models]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        parser.error("--names must give one distinct name per model")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {name: load_model(path, device) for name, path in zip(names, args.models)}
    loss_fns, by_config = {}, {}  # models sharing a data config share one loss function
    for name, model in models.items():
        config = dict(model.config.pretrained_cfg)
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in by_config:
            by_config[key] = train_subset_loss(args.dataset, config, args.samples, args.batch_size, device, args.seed)
        loss_fns[name] = by_config[key]
    report = landscape_report(
        models, loss_fns, args.out, seed=args.seed, alphas_1d=torch.linspace(-1, 1, 2 * args.grid - 1),
        alphas_2d=torch.linspace(-1, 1, args.grid), hessian_iters=args.hessian_iters, with_2d=not args.no_2d,
    )
    print("| model | top Hessian eigenvalue | train-subset loss |\n|---|---|---|")
    for name, entry in report["models"].items():
        losses = entry["landscape_1d"]["losses"]
        print(f"| {name} | {entry['top_hessian_eigenvalue']:.4g} | {losses[len(losses) // 2]:.4f} |")
    print(f"\n[landscape] {', '.join(os.path.basename(p) for p in report['files'].values())} in {args.out}")
    return report


def reproduce_landscape(output_dir: str, methods: list[str], dataset: str, seed: int = 0,
                        extra_argv: list[str] | None = None) -> dict:
    """`landscape_main` on one model per method of a `reproduce` output folder, into output_dir/landscape."""
    return landscape_main(["--models", ",".join(run_dir(output_dir, m, seed) for m in methods),
                           "--names", ",".join(methods), "--dataset", dataset,
                           "--out", os.path.join(output_dir, "landscape"), *(extra_argv or [])])
