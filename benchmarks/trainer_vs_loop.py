"""Where a training epoch's time goes under ESAMTrainer, against the bare `esam_hf.ESAM` loop.

Same model (quarter-width cifar_resnet18), same data (the bundled CIFAR-10 subset through its cached
uint8 tensor and batch augmentation), batch 64, one thread, for SGD, SAM, ESAM (the paper's
sharpness selection) and the default random selection. Per method and repeat, interleaved:
  - pipeline: the training DataLoader alone (index, augment, collate) for the timed steps;
  - bare loop: that DataLoader feeding `ESAM.step` + `optimizer.step` (the model's kernels + ESAM);
  - Trainer: `ESAMTrainer.train()` for the same steps (logging every 50 steps, no evaluation or saving).
Reported: process-time ms per step (median of repeats), the Trainer's overhead over the bare loop,
and the pipeline's share.

    python benchmarks/trainer_vs_loop.py [--steps 40] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

METHODS = {
    "sgd": dict(esam_rho=0.0, esam_beta=1.0, esam_gamma=1.0),
    "sam": dict(esam_rho=0.05, esam_beta=1.0, esam_gamma=1.0),
    "esam": dict(esam_rho=0.05, esam_beta=0.6, esam_gamma=0.5, esam_selection="sharpness"),
    "random": dict(esam_rho=0.03, esam_beta=0.6, esam_gamma=0.5, esam_selection="random"),
}


def build(seed: int = 0):
    from esam_hf.run import DataArguments, ModelArguments, build_model_and_data

    model_args = ModelArguments("cifar_resnet18", model_kwargs='{"channels": [16, 32, 64, 128]}')
    _, model, data = build_model_and_data(model_args, DataArguments("cifar10-subset", eval_split="none"), seed=seed)
    return model, data


def loader(data, batch: int, seed: int):
    return torch.utils.data.DataLoader(data.train_dataset, batch_size=batch, shuffle=True, drop_last=True,
                                       collate_fn=data.collator, generator=torch.Generator().manual_seed(seed))


def time_pipeline(data, batch, steps) -> float:
    it = iter(loader(data, batch, 0))
    start = time.process_time()
    for _ in range(steps):
        next(it)
    return (time.process_time() - start) / steps


def time_bare(method, batch, steps) -> float:
    from esam_hf import ESAM

    model, data = build()
    c = METHODS[method]
    esam = ESAM(model, rho=c["esam_rho"], beta=c["esam_beta"], gamma=c["esam_gamma"],
                selection=c.get("esam_selection", "sharpness"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()

    def loss_fn(b):
        out = model(pixel_values=b["pixel_values"])
        losses = F.cross_entropy(out.logits, b["labels"], reduction="none")
        return losses.mean(), losses.detach()

    it = iter(loader(data, batch, 0))
    next_batch = next(it)  # warm-up step, untimed
    esam.step(loss_fn, next_batch)
    opt.step()
    opt.zero_grad(set_to_none=True)
    start = time.process_time()
    for _ in range(steps):
        esam.step(loss_fn, next(it))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.process_time() - start) / steps


def time_trainer(method, batch, steps) -> float:
    from esam_hf.run import image_trainer
    from esam_hf.trainer import ESAMTrainingArguments

    model, data = build()
    with tempfile.TemporaryDirectory() as out:
        args = ESAMTrainingArguments(
            output_dir=out, max_steps=steps + 1, per_device_train_batch_size=batch, learning_rate=0.05,
            weight_decay=5e-4, optim="sgd", use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
            logging_steps=50, disable_tqdm=True, dataloader_num_workers=0, seed=0, **METHODS[method])
        trainer = image_trainer(model, data, args)
        clock = {}

        class Clock(__import__("transformers").TrainerCallback):  # from the end of the first (warm-up) step
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    clock["start"] = time.process_time()

        trainer.add_callback(Clock())
        trainer.train()
        return (time.process_time() - clock["start"]) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = args.methods.split(",")
    times = {m: {"bare": [], "trainer": []} for m in methods}
    pipeline = []
    _, data = build()
    for _ in range(args.repeats):
        pipeline.append(time_pipeline(data, args.batch, args.steps))
        for m in methods:
            times[m]["bare"].append(time_bare(m, args.batch, args.steps))
            times[m]["trainer"].append(time_trainer(m, args.batch, args.steps))
    pipe = statistics.median(pipeline) * 1e3
    print(f"CPU process time per step, batch {args.batch}, median of {args.repeats} interleaved repeats x {args.steps} "
          f"steps; torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| method | bare loop ms/step | ESAMTrainer ms/step | Trainer / bare | data pipeline ms/step (share of bare) |")
    print("|---|---|---|---|---|")
    result = {"pipeline_ms": pipe, "methods": {}}
    for m in methods:
        bare, tr = statistics.median(times[m]["bare"]) * 1e3, statistics.median(times[m]["trainer"]) * 1e3
        ratios = [t / b for t, b in zip(times[m]["trainer"], times[m]["bare"])]
        result["methods"][m] = {"bare_ms": bare, "trainer_ms": tr, "ratio_median": statistics.median(ratios),
                                "ratio_range": [min(ratios), max(ratios)]}
        print(f"| {m} | {bare:.1f} | {tr:.1f} | {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] | "
              f"{pipe:.1f} ({pipe / bare:.0%}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
