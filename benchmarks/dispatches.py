"""Operator dispatches per optimizer step: the host cost of a step, counted instead of timed.

On a GPU a small model's step is host-bound: each ATen operator the step dispatches costs the host
some 20 µs whatever its size, so a step's count of dispatches predicts its time where the kernels are
short. A count is exact and repeatable on any machine, unlike a clock. Counted with a
`TorchDispatchMode` from the start of an optimizer step to its end (forward and backward kernels,
ESAM's own work, clipping, the optimizer, zeroing), after two warm-up steps, median over the counted
steps. Model: quarter-width `cifar_resnet18` (62 parameter tensors), batch 16, random images, CPU.

    python benchmarks/dispatches.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer, TrainerCallback

# name -> ESAMTrainingArguments fields (None: the plain transformers.Trainer)
METHODS = {
    "trainer": None,
    "rho0": dict(esam_rho=0.0, esam_beta=1.0, esam_gamma=1.0),
    "sam": dict(esam_rho=0.05, esam_beta=1.0, esam_gamma=1.0),
    "default": dict(),  # ESAMTrainingArguments' defaults
    "random": dict(esam_rho=0.03, esam_beta=0.6, esam_gamma=0.5, esam_selection="random"),
    "esam": dict(esam_rho=0.05, esam_beta=0.6, esam_gamma=0.5, esam_selection="sharpness"),
    "ascent": dict(esam_rho=0.03, esam_beta=0.6, esam_gamma=0.5, esam_selection="ascent"),
}
BATCH, STEPS, WARMUP = 16, 5, 2


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _model(seed: int = 0):
    from esam_hf.models import create_model

    torch.manual_seed(seed)
    return create_model("cifar_resnet18", [str(i) for i in range(10)], channels=[16, 32, 64, 128])


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def count_trainer(method: str, steps: int = STEPS) -> float:
    """Median dispatches per optimizer step of `Trainer.train()` (method "trainer") or `ESAMTrainer.train()`."""
    from esam_hf import ESAMTrainer, ESAMTrainingArguments

    esam = METHODS[method]
    counts, mode = [], {}

    class Count(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= WARMUP:
                mode["on"] = Counter().__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if "on" in mode:
                counter = mode.pop("on")
                counter.__exit__(None, None, None)
                counts.append(counter.count)

    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, max_steps=WARMUP + steps, per_device_train_batch_size=BATCH, learning_rate=0.01,
                      use_cpu=True, report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True,
                      dataloader_num_workers=0, seed=0)
        if esam is None:
            from transformers import TrainingArguments

            trainer = Trainer(model=_model(), args=TrainingArguments(**common), train_dataset=_Images(BATCH * 8))
        else:
            trainer = ESAMTrainer(model=_model(), args=ESAMTrainingArguments(**common, **esam),
                                  train_dataset=_Images(BATCH * 8))
        trainer.add_callback(Count())
        trainer.train()
    return statistics.median(counts)


def count_loop(method: str, steps: int = STEPS) -> float:
    """Median dispatches per step of the bare loop: `ESAM.step` + `optimizer.step` + `zero_grad`, with the Trainer's
    default optimizer (fused AdamW) and the loss as a plain mean of per-example cross-entropies."""
    from esam_hf import ESAM
    from esam_hf.trainer import ESAMTrainingArguments, esam_config

    args = ESAMTrainingArguments(output_dir=tempfile.gettempdir(), use_cpu=True, learning_rate=0.01,
                                 **(METHODS[method] or {}))
    c = esam_config(args, prefix=False)
    model = _model()
    esam = ESAM(model, rho=c["rho"], beta=c["beta"], gamma=c["gamma"], selection=c["selection"])
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt = optimizer_cls(model.parameters(), **kwargs)
    data = _Images(BATCH)
    batch = {"pixel_values": data.x, "labels": data.y}
    model.train()

    def loss_fn(b):
        losses = F.cross_entropy(model(pixel_values=b["pixel_values"]).logits, b["labels"], reduction="none")
        return losses.mean(), losses.detach()

    counts = []
    for i in range(WARMUP + steps):
        counter = Counter() if i >= WARMUP else None
        with counter if counter is not None else contextlib.nullcontext():
            esam.step(loss_fn, batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if counter is not None:
            counts.append(counter.count)
    return statistics.median(counts)


def measure() -> dict:
    trainer = {m: count_trainer(m) for m in METHODS}
    loop = {m: count_loop(m) for m in METHODS if m not in ("trainer", "rho0")}
    return {"trainer": trainer, "loop": loop}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = measure()
    print(f"dispatches per optimizer step (quarter-width cifar_resnet18, batch {BATCH}, torch {torch.__version__})")
    print("| method | ESAMTrainer | bare loop | Trainer / loop |")
    print("|---|---|---|---|")
    for m, n in result["trainer"].items():
        loop = result["loop"].get(m)
        ratio = f"{n / loop:.3f}" if loop else ""
        name = "plain transformers.Trainer" if m == "trainer" else m
        print(f"| {name} | {n:.0f} | {loop if loop is not None else ''} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
