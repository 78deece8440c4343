"""Host time per training step: what a step costs on the CPU before (and between) its kernels.

The model is so small (an MLP of 12 blocks Linear(8, 8) + LayerNorm: 48 parameter tensors, about
as many as a ResNet-18's 62; batch 8) that its kernels cost next to nothing, so what is timed is the
Python and dispatch work a GPU step pays on the host: the Trainer's loop, ESAM's SWP draw, flat
buffers, selection and restore. Time is the process's CPU time (`time.process_time`, one thread), which a busy neighbour on a
shared machine disturbs far less than wall time. Methods are interleaved repeat by repeat; the median
and the minimum ms/step over repeats are reported.

    python benchmarks/host_time.py [--steps 200 --repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.modeling_outputs import ImageClassifierOutput

from transformers import TrainerCallback

from esam_hf import ESAM, ESAMTrainer, ESAMTrainingArguments

BATCH = 8


class Tiny(torch.nn.Module):
    def __init__(self, blocks=12, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width))
                                         for _ in range(blocks)])
        self.config = type("Config", (), {"problem_type": "single_label_classification"})()

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)[:, :4]
        return ImageClassifierOutput(loss=F.cross_entropy(logits, labels) if labels is not None else None, logits=logits)


def data(n):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


TRAINERS = {
    "trainer_sgd": (Trainer, {}),
    "trainer_sam": (ESAMTrainer, {"esam_beta": 1.0, "esam_gamma": 1.0}),
    "trainer_esam": (ESAMTrainer, {}),
}


class CPUTimer(TrainerCallback):
    """CPU seconds from the end of step `start` to the end of step `stop`."""

    def __init__(self, start, stop):
        self.start, self.stop, self.seconds = start, stop, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self.t0 = time.process_time()
        elif state.global_step == self.stop:
            self.seconds = time.process_time() - self.t0


def trainer_ms(name, steps, warmup, out_dir):
    cls, esam = TRAINERS[name]
    args = ESAMTrainingArguments(output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=warmup + steps,
                                 learning_rate=0.01, lr_scheduler_type="constant", save_strategy="no",
                                 logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                                 dataloader_num_workers=0, seed=0, **esam)
    model = Tiny()
    timer = CPUTimer(warmup, warmup + steps)
    cls(model=model, args=args, train_dataset=data(BATCH * (warmup + steps)), callbacks=[timer]).train()
    return 1000 * timer.seconds / steps


def bare_ms(name, steps, warmup):
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    esam = ESAM(model) if name == "bare_esam" else None
    x, y = torch.randn(BATCH, 8), torch.randint(0, 4, (BATCH,))

    def loss_fn(batch):
        losses = F.cross_entropy(model(batch[0]).logits, batch[1], reduction="none")
        return losses.mean(), losses.detach()

    def step():
        optimizer.zero_grad(set_to_none=True)
        if esam is None:
            loss_fn((x, y))[0].backward()
        else:
            esam.step(loss_fn, (x, y))
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return 1000 * (time.process_time() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # host work is single-threaded; more threads only add noise here
    methods = [*TRAINERS, "bare_sgd", "bare_esam"]
    times = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for m in methods:
                times[m].append(trainer_ms(m, args.steps, args.warmup, tmp) if m in TRAINERS
                                else bare_ms(m, args.steps, args.warmup))
    result = {m: {"median_ms": statistics.median(t), "min_ms": min(t), "all_ms": t} for m, t in times.items()}
    print("| method | median ms/step | min ms/step |\n|---|---|---|")
    for m, r in result.items():
        print(f"| {m} | {r['median_ms']:.2f} | {r['min_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "repeats": args.repeats, "torch": torch.__version__, "results": result}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
