"""`esam-hf reproduce`: the paper's comparison of SGD, SAM and ESAM, on one recipe over several seeds.

Every method x seed trains with the same recipe, schedule, seed and initial weights into
OUTPUT_DIR/<method>-seed<seed>/, each a reloadable model folder with its card and its record
(`esam_run.json`: settings, initial-weight checksum, status). Runs resume: a finished run with the
same settings is reused, a cut-off one continues from its last checkpoint, and a folder trained
with other settings is an error that says what differs. Every run logs per epoch its test accuracy,
train loss and cumulative training seconds (evaluation and checkpointing excluded) to
timeline.json; the runs are then summarised in OUTPUT_DIR/results.md, results.json and plots.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .arguments import argument_file_flags, explicit_options, make_parser, parse_args, usage_error
from .landscape import LandscapeOptions
from .landscape import main as landscape_main
from .plots import _new_figure, _save
from .recipes import OPTIMIZER_ESAM_ARGS, RECIPES, get_recipe, recipe_defaults, warmup_fraction
from .run import TRAIN_DEFAULTS, DataArguments, ModelArguments, restore_card, run_settings, train_image_classifier
from .run_folder import checkpoint_problem, checkpoints, read_json, read_record, settings_differences, write_json
from .timeline import TIMELINE, TimelineCallback, training_throughput

# Stands for "SAM's radius": the recipe's rho x beta, which SWP's 1/beta scaling brings back to rho.
SAM_RADIUS = "sam_radius"
# method -> (recipe optimizer, extra ESAMTrainingArguments). `esam` is the paper's ESAM (the recipe's rho,
# sharpness selection); `esam_warmup` the same with SDS starting at the whole batch and reaching gamma after
# 30% of training; `esam_random` a uniform random subset for the descent and `esam_ascent` for the ascent (the
# descent on the whole batch), both perturbing as far as SAM.
METHODS = {
    "sgd": ("sgd", {}),
    "sam": ("sam", {}),
    "esam": ("esam", {"esam_selection": "sharpness"}),
    "esam_warmup": ("esam", {"esam_selection": "sharpness", "esam_gamma_warmup": 0.3}),
    "esam_random": ("esam", {"esam_selection": "random", "esam_rho": SAM_RADIUS}),
    "esam_ascent": ("esam", {"esam_selection": "ascent", "esam_rho": SAM_RADIUS}),
}
# Fields that make a method what it is: re-imposed over the command line, so `--esam_rho 0.1`
# changes SAM and ESAM but leaves SGD plain SGD (and `--esam_gamma 0.3` leaves SAM SAM).
_DEFINING = {optimizer: tuple(fixed) for optimizer, fixed in OPTIMIZER_ESAM_ARGS.items()}
PROG = "esam-hf reproduce"


@dataclass
class ReproduceArguments:
    _argument_group_name = "reproduce"

    recipe: str = field(default="cifar10-resnet18", metadata={
        "help": "A recipe of `esam-hf recipes`.", "choices": list(RECIPES)})
    methods: str = field(default="sgd,sam,esam", metadata={"help": f"Comma-separated, of {', '.join(METHODS)}."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds, e.g. 0,1,2; every method trains each."})
    batch_size: int | None = field(default=None, metadata={
        "help": "Global batch. Other than the recipe's, the learning rate scales linearly (with a warm-up over 5 percent of the steps "
                "when larger). Default: the recipe's."})
    landscape: bool = field(default=False, metadata={
        "help": "Then compare the first seed's models' loss landscapes into OUTPUT_DIR/landscape."})
    plots: bool = field(default=True, metadata={"help": "Draw the accuracy and loss plots (needs matplotlib)."})

    def __post_init__(self):
        self.method_list = [m for m in self.methods.split(",") if m]
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown or not self.method_list:
            raise ValueError(f"--methods: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                             f"choose a comma-separated list of {', '.join(METHODS)}")
        try:
            self.seed_list = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2, got {self.seeds!r}") from None
        if not self.seed_list or len(set(self.seed_list)) != len(self.seed_list):
            raise ValueError(f"--seeds must list distinct integers such as 0,1,2, got {self.seeds!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch_size must be an integer >= 1 (the global batch), got {self.batch_size}")


@dataclass(kw_only=True)
class LandscapeGroup(LandscapeOptions):
    _argument_group_name = "landscape (with --landscape)"


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


def _parser(recipe: str, optimizer: str, extra: dict, batch_size: int | None):
    from .trainer import ESAMTrainingArguments

    batch, lr, warmup = batch_schedule(recipe, batch_size)
    r = get_recipe(recipe)
    warmup = max(warmup, r.options.get("warmup_fraction", 0.0))
    extra = {k: (round(r.rho * r.beta, 6) if v == SAM_RADIUS else v) for k, v in extra.items()}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    defaults = {**TRAIN_DEFAULTS, "dataloader_pin_memory": torch.cuda.is_available(),
                **recipe_defaults(recipe, optimizer), **extra, "output_dir": os.path.join("outputs", f"reproduce-{recipe}"),
                "per_device_train_batch_size": max(1, batch // world_size), "learning_rate": lr, **warmup_fraction(warmup)}
    return make_parser(
        [ReproduceArguments, LandscapeGroup, ModelArguments, DataArguments, ESAMTrainingArguments], prog=PROG,
        defaults=defaults,
        first_group=("ESAM (sharpness-aware minimization)", "esam_"),
        description="Train SGD, SAM and ESAM (--methods) on one recipe over several seeds (--seeds) into "
                    "OUTPUT_DIR/<method>-seed<seed>; then tables and plots.",
        epilog="Any model, data or TrainingArguments option (e.g. --num_train_epochs 30, --esam_gamma_warmup 0.3, "
               "--model_kwargs '{\"drop_rate\": 0.1}') applies to every run, except what defines a method: SGD keeps "
               "esam_rho 0 (beta = gamma = 1), SAM keeps esam_beta = esam_gamma = 1.")


def plan(argv: list[str] | None = None) -> tuple[ReproduceArguments, dict]:
    """The command's options and every run's `(model_args, data_args, training_args)`, by (method, seed):
    the recipe's defaults, then the command line, then what defines each method."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = make_parser([ReproduceArguments], prog=PROG, add_help=False)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # one argument file
        argv = argument_file_flags(pre, argv[0])
    recipe = pre.parse_known_args(argv)[0].recipe  # sets the defaults
    first = _parser(recipe, "esam", {}, None)
    opts, landscape, *_, training = parse_args(first, argv, trains=True)  # validates every option before any work
    opts.landscape_options = landscape
    if "seed" in explicit_options(first, argv):
        first.error("--seed: reproduce trains every seed of --seeds (e.g. --seeds 0,1,2); drop --seed")
    root = training.output_dir
    runs = {}
    for method in opts.method_list:
        optimizer, extra = METHODS[method]
        esam = get_recipe(recipe).esam_args(optimizer)
        defining = [f"--{name}={esam[name]}" for name in _DEFINING[optimizer]]
        # What makes the method itself (its selection, its warm-up) is re-imposed too; its rho stays settable.
        defining += [f"--{name}={value}" for name, value in extra.items() if name != "esam_rho"]
        for seed in opts.seed_list:
            run_argv = [*argv, f"--output_dir={run_dir(root, method, seed)}", f"--seed={seed}", *defining]
            _, _, model_args, data_args, training_args = parse_args(_parser(recipe, optimizer, extra, opts.batch_size),
                                                                    run_argv)
            runs[method, seed] = (model_args, data_args, training_args)
    opts.output_dir = root
    # Seed by seed, every method in turn: a host whose speed drifts during the command then slows all
    # methods alike, and the throughput ratios stay fair (method by method, the last would carry the drift).
    return opts, {(m, s): runs[m, s] for s in opts.seed_list for m in opts.method_list}


def run_state(model_args, data_args, training_args) -> str:
    """"new", "finished", "diverged" or "cut off" (resumable): refuses a folder trained with other settings."""
    out = training_args.output_dir
    if not os.path.isdir(out) or not os.listdir(out):
        return "new"
    record = read_record(out)
    if record is None:
        raise ValueError(f"{out} holds files but no esam_run.json, so what trained it is unknown: delete it, or "
                         "choose another --output_dir.")
    diffs = settings_differences(record["settings"], run_settings(model_args, data_args, training_args))
    if diffs:
        raise ValueError(f"{out} was trained with other settings (" + "; ".join(diffs[:8]) + "): delete it to "
                         "train it again with these, or choose another --output_dir.")
    return {"finished": "finished", "diverged": "diverged"}.get(record["status"], "cut off")


# --------------------------------------------------------------------------- #
# Training, with a per-epoch timeline
# --------------------------------------------------------------------------- #
def train_run(model_args, data_args, training_args, recipe: str) -> str:
    """Train one run unless it is done; continue it from its last checkpoint if it was cut off.
    Returns what it did: "skip", "resume", "train" or "diverged"."""
    from .trainer import TrainingDiverged

    out = training_args.output_dir
    name = os.path.basename(os.path.normpath(out))
    state = run_state(model_args, data_args, training_args)
    if state in ("finished", "diverged"):
        print(f"[reproduce] {name}: skip ({state}, same settings)", flush=True)
        if state == "finished" and not os.path.isfile(os.path.join(out, "README.md")) and training_args.should_save:
            restore_card(model_args, data_args, training_args, recipe=recipe)
            print(f"[reproduce] {name}: its model card was missing: written again from the saved run", flush=True)
        return "skip"
    # The newest complete checkpoint: one killed mid-save is skipped (see esam_hf.run_folder.checkpoint_problem).
    checkpoint = next((c for c in checkpoints(out) if checkpoint_problem(c) is None), None) if state == "cut off" else None
    print(f"[reproduce] {name}: " + (f"resume from {os.path.basename(checkpoint)}" if checkpoint else "train"), flush=True)
    try:
        train_image_classifier(model_args, data_args, training_args, recipe=recipe, resume_from_checkpoint=checkpoint,
                               callbacks=[TimelineCallback(os.path.join(out, TIMELINE))])
    except TrainingDiverged as e:
        print(f"[reproduce] {name}: {e}", flush=True)
        return "diverged"
    return "resume" if checkpoint else "train"


# --------------------------------------------------------------------------- #
# Summary: table, JSON, plots
# --------------------------------------------------------------------------- #
def load_run(path: str) -> dict:
    """A run's status, final accuracy, training seconds, images/s and timeline."""
    record = read_record(path) or {}
    final = record.get("metrics", {})
    epochs = read_json(os.path.join(path, TIMELINE), {"epochs": []})["epochs"]
    seconds, images_per_s = training_throughput(path, final)
    return {"status": record.get("status"), "accuracy": final.get("eval_accuracy"),
            "top5_accuracy": final.get("eval_top5_accuracy"), "train_seconds": seconds, "images_per_s": images_per_s,
            "initial_weights_sha256": record.get("initial_weights_sha256"), "eval_samples": record.get("eval_samples"),
            "epochs": final.get("epoch"), "timeline": epochs}


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per method: top-1 mean, std and range over the seeds that finished (diverged seeds are
    counted, never scored), mean training seconds, images/s and its ratio to SGD."""
    summary = {}
    for method, by_seed in runs.items():
        done = [r for r in by_seed.values() if r["status"] == "finished"]
        acc = [r["accuracy"] for r in done if r["accuracy"] is not None]  # none without evaluation
        summary[method] = {
            "seeds": list(by_seed), "finished": len(done), "diverged": sum(r["status"] == "diverged" for r in by_seed.values()),
            "top1_mean": statistics.fmean(acc) if acc else None,
            "top1_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "top1_min": min(acc, default=None), "top1_max": max(acc, default=None),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in done) if done else None,
            "images_per_s": statistics.fmean(r["images_per_s"] for r in done) if done else None,
        }
    sgd = summary.get("sgd", {}).get("images_per_s")
    for s in summary.values():
        s["images_per_s_vs_sgd"] = s["images_per_s"] / sgd if sgd and s["images_per_s"] else None
    return summary


def markdown(summary: dict[str, dict], header: str) -> str:
    lines = [header, "", "| method | seeds | top-1 % mean ± std | top-1 % min–max | train s | images/s | images/s vs SGD |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        seeds = f"{s['finished']}" + (f" ({s['diverged']} diverged)" if s["diverged"] else "")
        if not s["finished"]:
            lines.append(f"| {method} | {seeds} | {'diverged' if s['diverged'] else 'not finished'} | - | - | - | - |")
            continue
        ratio = f"{s['images_per_s_vs_sgd']:.2f}" if s["images_per_s_vs_sgd"] else "n/a"
        if s["top1_mean"] is None:
            top1, spread = "not evaluated", "-"
        else:
            top1 = f"{100 * s['top1_mean']:.2f} ± {100 * s['top1_std']:.2f}"
            spread = f"{100 * s['top1_min']:.2f}–{100 * s['top1_max']:.2f}"
        lines.append(f"| {method} | {seeds} | {top1} | {spread} | {s['train_seconds']:.1f} | "
                     f"{s['images_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def _curve_band(timelines: list[list[dict]], x: str, y: str):
    """Per epoch over the seeds that have it: mean x, mean y and the min-max of y."""
    rows = [[e for e in t if y in e] for t in timelines]
    n = min(map(len, rows), default=0)
    xs = [statistics.fmean(r[i][x] for r in rows) for i in range(n)]
    ys = [[r[i][y] for r in rows] for i in range(n)]
    return xs, [statistics.fmean(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def plot_curves(runs: dict[str, dict[int, dict]], out_dir: str, title: str) -> list[str]:
    """Test accuracy vs epoch and vs training seconds, and train loss vs epoch: one line per method
    (mean over seeds) in a band spanning the seeds."""
    paths = []
    for x, y, file, xlabel, ylabel, scale in [
        ("epoch", "eval_accuracy", "accuracy_vs_epoch.png", "epoch", "test top-1 (%)", 100),
        ("train_seconds", "eval_accuracy", "accuracy_vs_time.png", "training wall-clock (s)", "test top-1 (%)", 100),
        ("epoch", "train_loss", "train_loss.png", "epoch", "train loss", 1),
    ]:
        fig = _new_figure(6.5, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        for method, by_seed in runs.items():
            timelines = [r["timeline"] for r in by_seed.values() if r["status"] == "finished"]
            xs, mean, low, high = _curve_band(timelines, x, y)
            seeds = f"{len(timelines)} seed" + ("s" if len(timelines) != 1 else "")
            line, = ax.plot(xs, [scale * v for v in mean], marker="o", markersize=3, label=f"{method} ({seeds})")
            if len(timelines) > 1:
                ax.fill_between(xs, [scale * v for v in low], [scale * v for v in high], color=line.get_color(), alpha=0.2)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(f"{title}\n{ylabel}: mean over seeds, band = min-max", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, os.path.join(out_dir, file)))
    return paths


# --------------------------------------------------------------------------- #
# `esam-hf reproduce`
# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> dict:
    """Train every method x seed, then write and print the summary. Returns the results.json content."""
    opts, runs = plan(argv)
    if opts.plots:  # before hours of training, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(f"{PROG}: the plots need matplotlib: pip install 'esam-hf[plots]', or pass --plots false "
                             "(tables and JSON only).") from None
    try:  # a stale folder fails here, before training
        states = {key: run_state(*args) for key, args in runs.items()}
    except ValueError as e:
        usage_error(PROG, str(e))
    recipe = get_recipe(opts.recipe)
    _, first_data, first_args = next(iter(runs.values()))
    batch = first_args.per_device_train_batch_size * first_args.world_size * first_args.gradient_accumulation_steps
    if batch != recipe.batch_size:
        print(f"[reproduce] global batch {batch} instead of the recipe's {recipe.batch_size}: learning rate "
              f"{first_args.learning_rate:g} (recipe {recipe.learning_rate:g})")
    print(f"[reproduce] {len(runs)} runs: " + ", ".join(f"{m}-seed{s} ({states[m, s]})" for m, s in runs), flush=True)
    started, done_seconds, trained = time.perf_counter(), [], 0
    for k, ((method, seed), (model_args, data_args, training_args)) in enumerate(runs.items(), 1):
        # The ETA assumes the runs still to come take as long as the ones trained so far (methods differ).
        eta = (f", about {statistics.fmean(done_seconds) * (len(runs) - k + 1) / 60:.0f} min left"
               if done_seconds else "")
        print(f"[reproduce] run {k} of {len(runs)}: {method}-seed{seed}{eta}", flush=True)
        began = time.perf_counter()
        if train_run(model_args, data_args, training_args, recipe=f"{opts.recipe} ({method})") != "skip":
            done_seconds.append(time.perf_counter() - began)
            trained += 1
    print(f"[reproduce] {trained} run(s) trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if not first_args.should_save:  # under DDP only the main process summarises
        return {}
    results = write_results(opts, runs)
    if opts.landscape:
        results["landscape"] = reproduce_landscape(opts.output_dir, opts.method_list, first_data.dataset,
                                                   seed=opts.seed_list[0], options=opts.landscape_options)
    return results


def reproduce_landscape(output_dir: str, methods: list[str], dataset: str, seed: int = 0,
                        options: LandscapeOptions | None = None) -> dict:
    """`esam-hf landscape` on one model per method of a `reproduce` output folder, into output_dir/landscape."""
    return landscape_main(["--models", ",".join(run_dir(output_dir, m, seed) for m in methods),
                           "--names", ",".join(methods), "--dataset", dataset,
                           "--output_dir", os.path.join(output_dir, "landscape"),
                           *(options or LandscapeOptions()).landscape_argv()])


def _epochs_trained(loaded: dict) -> str:
    """The epochs the runs trained (not the epochs asked for): "30", "0.0038", "2-3" when they differ."""
    done = sorted({round(r["epochs"], 4) for by in loaded.values() for r in by.values() if r["epochs"] is not None})
    if not done:
        return "?"
    return f"{done[0]:g}" if len(done) == 1 else f"{done[0]:g}-{done[-1]:g}"


def write_results(opts: ReproduceArguments, runs: dict) -> dict:
    """results.md (printed too), results.json and the plots, from the runs' folders."""
    from .benchmark import environment

    loaded = {m: {s: load_run(runs[m, s][2].output_dir) for s in opts.seed_list} for m in opts.method_list}
    model_args, data_args, training_args = next(iter(runs.values()))
    batch = training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    return write_summary(opts.output_dir, loaded, recipe=opts.recipe, model=model_args.model_name,
                         dataset=data_args.dataset, batch=batch, learning_rate=training_args.learning_rate,
                         env=environment(), plots=opts.plots)


def write_summary(output_dir: str, loaded: dict, *, recipe: str, model: str, dataset: str, batch: int,
                  learning_rate: float, env: dict, plots: bool = True, eval_samples: int | None = None) -> dict:
    """results.md (printed too), results.json and the plots of loaded runs ({method: {seed: load_run(...)}}).
    A local dataset is named by its folder's name, never its path (these files get published)."""
    from .hub import resolve_card_dataset

    summary, seeds = summarize(loaded), sorted({s for by in loaded.values() for s in by})
    dataset = resolve_card_dataset(dataset)["name"]
    eval_samples = eval_samples or next((r["eval_samples"] for by in loaded.values() for r in by.values()
                                         if r["eval_samples"]), None)
    epochs = _epochs_trained(loaded)
    header = (f"Recipe {recipe}: {model} on {dataset}, {epochs} epochs, batch {batch}, lr {learning_rate:g}, "
              f"test set {eval_samples or '?'} images, seeds {','.join(map(str, seeds))}. Device: "
              f"{env['device']}. Training seconds exclude evaluation.")
    table = markdown(summary, header)
    drawn = []
    if plots:
        title = f"{recipe}: {model} on {dataset}, {epochs} epochs, test set {eval_samples or '?'} images"
        try:
            drawn = [os.path.basename(p) for p in plot_curves(loaded, output_dir, title)]
        except Exception as e:  # the tables must not be lost to a plotting problem
            print(f"[reproduce] plots failed ({type(e).__name__}: {e}); tables and JSON are written", flush=True)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(f"![{p}]({p})" for p in drawn) + "\n")
    results = {"recipe": recipe, "model": model, "dataset": dataset, "epochs": epochs, "batch_size": batch,
               "learning_rate": learning_rate, "eval_samples": eval_samples, "seeds": seeds, "environment": env,
               "methods": summary, "plots": drawn, "runs": {m: {str(s): r for s, r in by.items()} for m, by in loaded.items()}}
    write_json(os.path.join(output_dir, "results.json"), results)
    print(table)
    print("\n[reproduce] results.md, results.json" + (" and plots" if drawn else "") + f" in {output_dir}")
    return results
