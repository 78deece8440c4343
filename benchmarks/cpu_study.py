"""Accuracy per unit of compute on CPU: SGD, SAM and ESAM modes on a small real-image task.

A plain PyTorch loop around `esam_hf.ESAM` (no Trainer), one thread per run so two runs share a
2-core machine without disturbing each other's process time. Training data: a class-stratified
share of the bundled CIFAR-10 subset (3,000 train / 1,000 test images), optionally with seeded
symmetric label noise on the training split only. Each run appends one JSON line to `--out`:
its settings, test accuracy, final training loss and the process time of training (evaluation
excluded).

    python benchmarks/cpu_study.py --method sam --rho 0.2 --seed 0 --out benchmarks/results/cpu_study.jsonl
    python benchmarks/cpu_study.py --sweep "sgd,sam,esam" --seeds 0,1,2 --rho 0.2 --out ...   # in sequence
    python benchmarks/cpu_study.py --check --out /tmp/check.jsonl    # regression check, ~5 minutes on 2 cores
    python benchmarks/cpu_study.py --report --out benchmarks/results/cpu_study.jsonl --plot study.png

The methods (beta, gamma, selection; rho from --rho, 0 for sgd):
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

METHODS = {
    "sgd": dict(beta=1.0, gamma=1.0, selection="sharpness", rho=0.0),
    "sam": dict(beta=1.0, gamma=1.0, selection="sharpness"),
    "esam": dict(beta=0.6, gamma=0.5, selection="sharpness"),  # the paper's ESAM
    "random": dict(beta=0.6, gamma=0.5, selection="random"),
    "balanced": dict(beta=0.6, gamma=0.5, selection="balanced"),
    "clean_loss": dict(beta=0.6, gamma=0.5, selection="clean_loss"),  # no selection forward pass
    "swp": dict(beta=0.6, gamma=1.0, selection="sharpness"),  # SWP only
    "sds": dict(beta=1.0, gamma=0.5, selection="sharpness"),  # SDS only
    "warmup": dict(beta=0.6, gamma=0.5, selection="sharpness", gamma_warmup=0.3),
}
__doc__ += "".join(f"    {name:9s} {spec}\n" for name, spec in METHODS.items())


def load_subset(n_train: int, noise: float, noise_seed: int = 0):
    """uint8 images and int64 labels of the bundled subset: the first n_train/10 training images of
    each class (the subset's rows are shuffled), with `noise` of them relabelled uniformly at random to
    another class (seeded by `noise_seed`, the same for every method and training seed)."""
    import datasets

    from esam_hf.data.cifar import cifar_tensors
    from esam_hf.data.specs import CIFAR10_SUBSET_DIR

    ds = datasets.load_dataset(str(CIFAR10_SUBSET_DIR))
    x_train, y_train = cifar_tensors(ds["train"], "img", "label")
    x_test, y_test = cifar_tensors(ds["test"], "img", "label")
    per_class = n_train // 10
    index = torch.cat([torch.nonzero(y_train == c).flatten()[:per_class] for c in range(10)]).sort().values
    x_train, y_train = x_train[index], y_train[index].clone()
    if noise > 0:
        gen = torch.Generator().manual_seed(noise_seed)
        flip = torch.randperm(len(y_train), generator=gen)[: round(noise * len(y_train))]
        y_train[flip] = (y_train[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    return x_train, y_train, x_test, y_test


def run(args) -> dict:
    import timm

    import esam_hf.models  # noqa: F401  (registers cifar_resnet18 with timm)
    from esam_hf import ESAM
    from esam_hf.data.cifar import CifarAugment
    from esam_hf.esam import scheduled_gamma

    torch.set_num_threads(args.threads)
    spec = dict(METHODS[args.method])
    rho = spec.pop("rho", args.rho)
    for key in ("beta", "gamma", "selection", "gamma_warmup"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    warmup = spec.pop("gamma_warmup", 0.0)

    x_train, y_train, x_test, y_test = load_subset(args.n_train, args.noise)
    torch.manual_seed(args.seed)
    width = args.width
    model = timm.create_model("cifar_resnet18", num_classes=10, channels=[width, 2 * width, 4 * width, 8 * width])
    augment = CifarAugment(train=True, crop=args.aug, flip=args.aug, cutout=False,
                           generator=torch.Generator().manual_seed(args.seed))
    normalise = CifarAugment(train=False)
    steps_per_epoch = len(x_train) // args.batch
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.25)
    esam = ESAM(model, rho=rho, seed=args.seed, **spec)

    def loss_fn(batch):
        x, y = batch
        losses = F.cross_entropy(model(x), y, reduction="none")
        return losses.mean(), losses.detach()

    order_gen = torch.Generator().manual_seed(args.seed)
    start = time.process_time()
    wall = time.perf_counter()
    model.train()
    step, recent = 0, []
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=order_gen)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            x, y = augment(x_train[idx]), y_train[idx]
            g = scheduled_gamma(esam.gamma, step / total, warmup) if warmup else None
            loss = esam.step(loss_fn, (x, y), gamma=g, groups=y)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            recent.append(loss)
        if not math.isfinite(float(loss)):
            break
    train_loss = float(torch.stack(recent[-steps_per_epoch:]).mean())
    train_s = time.process_time() - start
    wall_s = time.perf_counter() - wall

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_test), 500):
            correct += int((model(normalise(x_test[i:i + 500])).argmax(1) == y_test[i:i + 500]).sum())
    diverged = not math.isfinite(train_loss)
    return {
        "method": args.method, "rho": rho, **spec, "gamma_warmup": warmup, "seed": args.seed,
        "n_train": len(x_train), "noise": args.noise, "aug": args.aug, "width": width, "epochs": args.epochs,
        "batch": args.batch, "lr": args.lr, "wd": args.wd, "threads": args.threads,
        "test_acc": None if diverged else 100.0 * correct / len(x_test), "n_test": len(x_test),
        "train_loss": train_loss, "train_process_s": round(train_s, 2), "train_wall_s": round(wall_s, 2),
        "steps": step, "torch": torch.__version__, "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def settings_key(r: dict) -> tuple:
    """Runs that differ only in their seed."""
    return tuple((k, r[k]) for k in ("method", "rho", "beta", "gamma", "selection", "gamma_warmup", "n_train", "noise",
                                      "aug", "width", "epochs", "batch", "lr", "wd"))


def report(path: Path, plot: Path | None = None, min_seeds: int = 1) -> str:
    """Markdown table (mean and std over seeds of test accuracy and training process time, throughput
    relative to SAM of the same setting) and, with `plot`, accuracy against process time."""
    import statistics

    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(settings_key(r), []).append(r)
    rows = []
    for key, rs in groups.items():
        if len(rs) < min_seeds:
            continue
        accs = [r["test_acc"] if r["test_acc"] is not None else float("nan") for r in rs]
        secs = [r["train_process_s"] for r in rs]
        rows.append((dict(key), accs, secs, sorted(r["seed"] for r in rs)))
    # Cost does not depend on rho: every method is compared with SAM's median time on the same data and network.
    method_fields = ("method", "rho", "beta", "gamma", "selection", "gamma_warmup")
    sam_secs: dict[tuple, list[float]] = {}
    for k, accs, secs, _ in rows:
        if k["method"] == "sam":
            sam_secs.setdefault(tuple((n, v) for n, v in k.items() if n not in method_fields), []).extend(secs)
    sam_time = {key: statistics.median(v) for key, v in sam_secs.items()}
    lines = ["| setting | method | beta | gamma | selection | seeds | top-1 % (mean ± std) | process s | vs SAM |",
             "|---|---|---|---|---|---|---|---|---|"]
    points = []
    for k, accs, secs, seeds in sorted(rows, key=lambda row: (str(row[0]["n_train"]), row[0]["rho"], row[0]["method"])):
        base = tuple((n, v) for n, v in k.items() if n not in method_fields)
        speed = sam_time.get(base, float("nan")) / statistics.median(secs)
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        setting = (f"{k['n_train']} img, noise {k['noise']}, {'aug' if k['aug'] else 'no aug'}, width {k['width']}, "
                   f"{k['epochs']} ep")
        warm = f" + warm-up {k['gamma_warmup']}" if k["gamma_warmup"] else ""
        lines.append(f"| {setting} | {k['method']}{warm} (rho {k['rho']}) | {k['beta']} | {k['gamma']} | {k['selection']} | "
                     f"{','.join(map(str, seeds))} | {statistics.mean(accs):.2f} ± {std:.2f} | "
                     f"{statistics.median(secs):.0f} | {speed:.2f}x |")
        label = f"{k['method']}{warm} rho {k['rho']}"
        defaults = METHODS.get(k["method"], {})
        label += "".join(f" {name} {k[name]}" for name in ("beta", "gamma") if name in defaults and k[name] != defaults[name])
        points.append((label, statistics.mean(accs), std, statistics.median(secs), setting))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        settings = sorted({p[4] for p in points})
        fig, axes = plt.subplots(1, len(settings), figsize=(9 * len(settings), 5.5), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            mine = sorted((p for p in points if p[4] == setting), key=lambda p: (p[3], p[1]))
            for i, (name, acc, std, sec, _) in enumerate(mine):
                ax.errorbar(sec, acc, yerr=0 if std != std else std, fmt="o", capsize=3)
                # Alternate the label side so that neighbouring points stay readable.
                right = sec > 0.8 * max(p[3] for p in mine)  # labels of the costliest points go to their left
                ax.annotate(name, (sec, acc), textcoords="offset points", xytext=(-6 if right else 6, 6 if i % 2 else -11),
                            ha="right" if right else "left", fontsize=8)
            ax.set_xlabel("training process time, s (1 thread)")
            ax.set_ylabel("test top-1 % (mean ± std over seeds)")
            ax.set_title(setting, fontsize=9)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return "\n".join(lines)


# The regression check: the benchmark's setting, one seed, SGD and SAM (rho 0.2) against the recommended
# mode (ESAMTrainer's defaults: random selection, beta 0.6, gamma 0.5, at rho 0.2 x beta = 0.12).
CHECK = (("sgd", 0.0), ("sam", 0.2), ("random", 0.12))
CHECK_MARGIN = 2.0  # points: SAM must beat SGD by this; the recommended mode may trail SAM by at most 1.5x it


def _check_one(spec):
    method, rho, base = spec
    args = argparse.Namespace(**{**vars(base), "method": method, "rho": rho})
    return run(args)


def check(args) -> bool:
    """Run CHECK in two processes (SAM alone, the others together); print the accuracies and whether
    the ordering SAM > SGD + CHECK_MARGIN and recommended >= SAM - 1.5 CHECK_MARGIN holds."""
    import multiprocessing

    base = argparse.Namespace(**{**vars(args), "beta": None, "gamma": None, "selection": None, "gamma_warmup": None})
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_check_one, [(m, rho, base) for m, rho in (CHECK[1], CHECK[0], CHECK[2])], chunksize=1)
    with open(args.out, "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    acc = {r["method"]: r["test_acc"] or 0.0 for r in results}
    secs = {r["method"]: r["train_process_s"] for r in results}
    for r in results:
        print(f"{r['method']:7s} rho {r['rho']:<5} top-1 {r['test_acc']}%  {r['train_process_s']:.0f} s")
    sam_beats_sgd = acc["sam"] > acc["sgd"] + CHECK_MARGIN
    mode_keeps_up = acc["random"] >= acc["sam"] - 1.5 * CHECK_MARGIN
    print(f"SAM > SGD + {CHECK_MARGIN}: {'yes' if sam_beats_sgd else 'NO'}; recommended mode >= SAM - "
          f"{1.5 * CHECK_MARGIN}: {'yes' if mode_keeps_up else 'NO'}; recommended mode throughput "
          f"{secs['sam'] / secs['random']:.2f}x SAM (process time)")
    print("ordering holds" if sam_beats_sgd and mode_keeps_up else "ORDERING BROKEN")
    return sam_beats_sgd and mode_keeps_up


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(METHODS), default="sam")
    p.add_argument("--sweep", help="comma-separated methods to run in sequence (overrides --method)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for --sweep (default: --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rho", type=float, default=0.2)
    p.add_argument("--beta", type=float)
    p.add_argument("--gamma", type=float)
    p.add_argument("--selection")
    p.add_argument("--gamma_warmup", type=float)
    p.add_argument("--n_train", type=int, default=1000, help="training images, 10 classes alike (<= 3000)")
    p.add_argument("--noise", type=float, default=0.0, help="symmetric label noise on the training split")
    p.add_argument("--aug", action="store_true", help="random crop (padding 4) and horizontal flip")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (ResNet-18: 64)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file each run appends to")
    p.add_argument("--report", action="store_true", help="print the table of --out (and --plot) instead of training")
    p.add_argument("--check", action="store_true", help="regression check: SGD, SAM and the recommended mode, seed 0, "
                   "in two processes; prints whether the ordering holds (exit status 1 if not)")
    p.add_argument("--plot", type=Path, help="with --report: accuracy against process time, as a PNG")
    p.add_argument("--min_seeds", type=int, default=1, help="with --report: leave out settings with fewer seeds")
    args = p.parse_args(argv)
    if not 10 <= args.n_train <= 3000:
        p.error(f"--n_train must be in [10, 3000] (the bundled subset has 300 images per class), got {args.n_train}")
    if not 0 <= args.noise < 0.9:
        p.error(f"--noise must be in [0, 0.9), got {args.noise}")
    return args


def main(argv=None):
    args = parse(argv)
    if args.report:
        print(report(args.out, args.plot, args.min_seeds))
        return
    if args.check:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sys.exit(0 if check(args) else 1)
    methods = args.sweep.split(",") if args.sweep else [args.method]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for method in methods:
            if method not in METHODS:
                sys.exit(f"unknown method {method!r}; choose from {sorted(METHODS)}")
            args.method, args.seed = method, seed
            result = run(args)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{method:9s} seed {seed}: acc {result['test_acc']} loss {result['train_loss']:.3f} "
                  f"{result['train_process_s']:.0f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
