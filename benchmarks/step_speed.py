"""How fast is one optimizer step, and what does it cost the host?

Subcommands (`python benchmarks/step_speed.py COMMAND --help` for each one's options):

    bare         time and torch.profiler of the bare `esam_hf.ESAM` loop (no Trainer)
                 python benchmarks/step_speed.py bare --batch 128
    trainer      ESAMTrainer against the bare loop, process time per step
                 python benchmarks/step_speed.py trainer --steps 40 --repeats 3 --json out.json
    dispatches   operator dispatches per optimizer step (the host cost, counted instead of timed)
                 python benchmarks/step_speed.py dispatches --json out.json
    compile      what torch_compile=True costs and saves (compile time, recompiles, steady-state step)
                 python benchmarks/step_speed.py compile --out OUT
    fsdp         FSDP2 against DDP, images/s through ESAMTrainer (launches torchrun workers)
                 python benchmarks/step_speed.py fsdp --out OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from subcommands import run_subcommand  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]


# --- bare: time and profile the bare esam_hf.ESAM loop -------------------------------------------------------------

def bare(args, parser) -> None:
    """Time and profile one optimizer step of SGD, SAM and ESAM in a plain PyTorch loop (no Trainer).

    Methods are interleaved, median of --repeats (5) repeats of --steps (5) steps; then a torch.profiler table of three
    steps of the recommended mode (selection "ascent"), SAM and the paper's ESAM and, on a GPU, how busy
    the GPU was during them (kernel time / wall time: well below 1 means the step is launch- or
    host-bound, not compute-bound).

        python benchmarks/step_speed.py bare                   # CPU: quarter-width cifar_resnet18, batch 64
        python benchmarks/step_speed.py bare --batch 128       # GPU: full-width cifar_resnet18, batch 128, fp32
    """
    import timm
    from torch.profiler import ProfilerActivity, profile

    import esam_hf.models  # noqa: F401  (registers cifar_resnet18)
    from esam_hf import ESAM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    batch = args.batch or (128 if cuda else 64)
    torch.manual_seed(0)
    kwargs = {} if cuda else {"channels": [16, 32, 64, 128]}  # two CPU cores: a quarter-width model
    model = timm.create_model(args.model, num_classes=10, **kwargs).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_fn(b):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(b[0])
        losses = F.cross_entropy(logits.float(), b[1], reduction="none")
        return losses.mean(), losses.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    methods = {"sgd": None, "sam": ESAM(model, rho=0.05, beta=1, gamma=1),
               "esam": ESAM(model, rho=0.05, beta=0.6, gamma=0.5),
               "esam_random": ESAM(model, rho=0.05, beta=0.6, gamma=0.5, selection="random"),
               "esam_ascent": ESAM(model, rho=0.05, beta=0.6, gamma=0.5, selection="ascent")}

    def step(esam):
        opt.zero_grad(set_to_none=True)
        if esam is None:
            loss_fn((x, y))[0].backward()
        else:
            esam.step(loss_fn, (x, y))
        opt.step()

    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, esam in methods.items():
            step(esam)
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                step(esam)
            sync()
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "batch": batch,
              "bf16": args.bf16, "channels_last": args.channels_last, "model": args.model,
              "images_per_s": {k: batch / v for k, v in med.items()},
              "ratios": {"esam/sgd": med["sgd"] / med["esam"], "sam/sgd": med["sgd"] / med["sam"],
                         "esam/sam": med["sam"] / med["esam"], "esam_random/sgd": med["sgd"] / med["esam_random"],
                         "esam_ascent/sgd": med["sgd"] / med["esam_ascent"],
                         "esam_ascent/sam": med["sam"] / med["esam_ascent"]}}

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    result["profile"] = {}
    for name in ("esam_ascent", "sam", "esam"):  # the recommended mode first: a run cut short still answers
        sync()
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(3):
                step(methods[name])
            sync()
            wall = time.perf_counter() - t
        averages = prof.key_averages()
        entry = {"wall_ms_per_step": wall / 3 * 1e3}
        if cuda:  # well below 1: the step waits on the host (launches, Python), not on the GPU
            kernel_us = sum(e.self_device_time_total for e in averages)
            entry.update(gpu_kernel_ms_per_step=kernel_us / 3e3, gpu_busy_fraction=kernel_us / 1e6 / wall)
        result["profile"][name] = entry
        print(f"--- {name}: three profiled steps")
        print(averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15))
        if args.trace:
            prof.export_chrome_trace(args.trace.replace(".json", f"-{name}.json"))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def bare_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 64 on CPU")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--model", default="cifar_resnet18")
    parser.add_argument("--json", default=None, help="also write the timings here")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (the median is reported)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--trace", default=None, help="write chrome traces of the profiled steps here (NAME.json "
                        "gives NAME-<method>.json)")


# --- trainer: ESAMTrainer against the bare loop, process time ------------------------------------------------------

TRAINER_METHODS = {
    "sgd": dict(esam_rho=0.0, esam_beta=1.0, esam_gamma=1.0),
    "sam": dict(esam_rho=0.05, esam_beta=1.0, esam_gamma=1.0),
    "esam": dict(esam_rho=0.05, esam_beta=0.6, esam_gamma=0.5, esam_selection="sharpness"),
    "random": dict(esam_rho=0.03, esam_beta=0.6, esam_gamma=0.5, esam_selection="random"),
    "ascent": dict(esam_rho=0.03, esam_beta=0.6, esam_gamma=0.5, esam_selection="ascent"),
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
    c = TRAINER_METHODS[method]
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
            logging_steps=50, disable_tqdm=True, dataloader_num_workers=0, seed=0, **TRAINER_METHODS[method])
        trainer = image_trainer(model, data, args)
        clock = {}

        class Clock(__import__("transformers").TrainerCallback):  # from the end of the first (warm-up) step
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    clock["start"] = time.process_time()

        trainer.add_callback(Clock())
        trainer.train()
        return (time.process_time() - clock["start"]) / steps


def trainer_vs_loop(args, parser) -> None:
    """Where a training epoch's time goes under ESAMTrainer, against the bare `esam_hf.ESAM` loop.

    Same model (quarter-width cifar_resnet18), same data (the bundled CIFAR-10 subset through its cached
    uint8 tensor and batch augmentation), batch 64, one thread, for SGD, SAM, ESAM (the paper's
    sharpness selection), random selection and the ascent subset. Per method and repeat, interleaved:
      - pipeline: the training DataLoader alone (index, augment, collate) for the timed steps;
      - bare loop: that DataLoader feeding `ESAM.step` + `optimizer.step` (the model's kernels + ESAM);
      - Trainer: `ESAMTrainer.train()` for the same steps (logging every 50 steps, no evaluation or saving).
    Reported: process-time ms per step (median of repeats), the Trainer's overhead over the bare loop,
    and the pipeline's share.

        python benchmarks/step_speed.py trainer [--steps 40] [--repeats 3] [--json out.json]
    """
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
        bare_ms, tr = statistics.median(times[m]["bare"]) * 1e3, statistics.median(times[m]["trainer"]) * 1e3
        ratios = [t / b for t, b in zip(times[m]["trainer"], times[m]["bare"])]
        result["methods"][m] = {"bare_ms": bare_ms, "trainer_ms": tr, "ratio_median": statistics.median(ratios),
                                "ratio_range": [min(ratios), max(ratios)]}
        print(f"| {m} | {bare_ms:.1f} | {tr:.1f} | {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] | "
              f"{pipe:.1f} ({pipe / bare_ms:.0%}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def trainer_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default=",".join(TRAINER_METHODS))
    parser.add_argument("--json", default=None)


# --- dispatches: operator dispatches per optimizer step ------------------------------------------------------------

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
    from transformers import Trainer, TrainerCallback

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
    from transformers import Trainer

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


def count_dispatches() -> dict:
    trainer = {m: count_trainer(m) for m in METHODS}
    loop = {m: count_loop(m) for m in METHODS if m not in ("trainer", "rho0")}
    return {"trainer": trainer, "loop": loop}


def dispatches(args, parser) -> None:
    """Operator dispatches per optimizer step: the host cost of a step, counted instead of timed.

    On a GPU a small model's step is host-bound: each ATen operator the step dispatches costs the host
    some 20 µs whatever its size, so a step's count of dispatches predicts its time where the kernels are
    short. A count is exact and repeatable on any machine, unlike a clock. Counted with a
    `TorchDispatchMode` from the start of an optimizer step to its end (forward and backward kernels,
    ESAM's own work, clipping, the optimizer, zeroing), after two warm-up steps, median over the counted
    steps. Model: quarter-width `cifar_resnet18` (62 parameter tensors), batch 16, random images, CPU.

        python benchmarks/step_speed.py dispatches [--json out.json]
    """
    torch.set_num_threads(1)
    result = count_dispatches()
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


def dispatches_arguments(parser) -> None:
    parser.add_argument("--json", default=None)


# --- compile: what torch_compile=True costs and saves --------------------------------------------------------------

COMPILE_METHODS = {"plain": dict(esam_rho=0.0), "defaults": {},
                   "paper": dict(esam_rho=0.05, esam_selection="sharpness")}
COMPILE_VARIANTS = ("eager", "compiled", "static")


def compile_worker(method: str, variant: str, backend: str, steps: int, out: str) -> None:
    import transformers
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback, ViTConfig, ViTForImageClassification

    import esam_hf.trainer
    from esam_hf import ESAMTrainer, ESAMTrainingArguments

    transformers.logging.set_verbosity_error()
    compiled = variant != "eager"
    if variant == "static":
        esam_hf.trainer._mark_batch_dynamic = lambda batch: None
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
        problem_type="single_label_classification"))
    g = torch.Generator().manual_seed(0)
    batch = 32
    x, y = torch.randn(steps * batch, 3, 16, 16, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)
    data = [{"pixel_values": x[i], "labels": y[i]} for i in range(len(y))]

    def cpu_time():  # this process and the compiler processes it waited for
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    class StepClock(TrainerCallback):
        times: list = []

        def on_step_begin(self, *args, **kwargs):
            self.start = cpu_time()

        def on_step_end(self, *args, **kwargs):
            self.times.append(cpu_time() - self.start)

    recompiles = []

    class Reasons:  # dynamo logs each recompile's failed guards ("    - 0/0: tensor ... size mismatch") here
        def write(self, text):
            recompiles.extend(m.group(1) for m in re.finditer(r"^\s+- (\d+/\d+: .*)$", text, re.M))

    import logging

    torch._logging.set_logs(recompiles=True)
    handler = logging.StreamHandler(Reasons())
    logging.getLogger("torch._dynamo").addHandler(handler)
    args = ESAMTrainingArguments(
        output_dir=f"{out}/run", per_device_train_batch_size=batch, max_steps=steps, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", report_to="none", use_cpu=True, seed=0, save_strategy="no", logging_steps=steps,
        disable_tqdm=True, dataloader_num_workers=0, torch_compile=compiled,
        torch_compile_backend=backend if compiled else None, **COMPILE_METHODS[method])  # a backend alone turns compile on
    clock = StepClock()
    trainer = ESAMTrainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    trainer.train()
    times = clock.times
    steady = statistics.median(times[len(times) // 2:])
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}/weights.pt")
    result = {"method": method, "variant": variant, "first_step_s": times[0], "steady_ms": 1000 * steady,
              "overhead_s": sum(times) - len(times) * steady, "graphs": counters["stats"]["unique_graphs"],
              "recompile_reasons": recompiles}
    Path(f"{out}/result.json").write_text(json.dumps(result))


def compile_cost(a, parser) -> None:
    """What `torch_compile=True` costs and saves with ESAMTrainer: compile time, recompiles, steady-state step
    time, compiled against eager, for plain training (esam_rho=0), the defaults (random selection) and the
    paper's ESAM (sharpness selection), on a small ViT (`problem_type` set, so that transformers' loss does
    not recompile by setting it). Variants: eager; compiled (ESAMTrainer marks the batch dimension dynamic,
    so SDS's k-row subsets reuse the B-row graph); compiled with a static batch (that marking off: the SDS
    subset recompiles). Each run is a fresh process (dynamo's caches are per process), runs are interleaved
    repeat by repeat, and times are process time (inductor compiles in the process:
    TORCHINDUCTOR_COMPILE_THREADS=1, and the C++ compiler it runs is counted too), on one thread (a CPU-time
    clock on a shared machine: idle OpenMP workers would spin and count), reported as medians over repeats.

        python benchmarks/step_speed.py compile --out OUT [--steps S] [--repeats R] [--backend inductor]

    Per run: the first step (where the graphs are compiled), the steady-state ms/step (median of the last half
    of the steps), the compile overhead (the run's step time beyond steps x steady state), the graphs dynamo
    compiled and why it recompiled, and the largest difference of the final weights from the eager run of
    the same method (same seed, same batches).
    """
    if a.steps < 4 or a.repeats < 1:
        parser.error("--steps must be >= 4 and --repeats >= 1")
    if a.worker:
        method, variant, out = a.worker
        return compile_worker(method, variant, a.backend, a.steps, out)
    if not a.out:
        parser.error("--out is required")

    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = []
    for repeat in range(a.repeats):
        for method in COMPILE_METHODS:
            for variant in COMPILE_VARIANTS if method != "plain" else COMPILE_VARIANTS[:2]:  # plain takes no subsets
                out = Path(a.out) / f"r{repeat}_{method}_{variant}"
                out.mkdir(parents=True, exist_ok=True)
                # A fresh inductor cache per run: every run compiles cold, as a first run does.
                subprocess.run([sys.executable, __file__, "compile", "--steps", str(a.steps), "--backend", a.backend,
                                "--worker", method, variant, str(out)], check=True, cwd=ROOT,
                               env={**env, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")})
                run = json.loads((out / "result.json").read_text())
                run["repeat"] = repeat
                if variant != "eager":
                    eager = torch.load(out.parent / f"r{repeat}_{method}_eager" / "weights.pt")
                    weights = torch.load(out / "weights.pt")
                    run["max_weight_diff"] = max(float((weights[k] - v).abs().max()) for k, v in eager.items())
                runs.append(run)
                print(json.dumps(run), flush=True)
    lines = ["| method | variant | ms/step | /eager | first step s | compile overhead s | graphs | max weight diff "
             "from eager |", "|---|---|---|---|---|---|---|---|"]
    for method in COMPILE_METHODS:
        def median(key, variant):
            return statistics.median(r[key] for r in runs if r["method"] == method and r["variant"] == variant)
        for variant in sorted({r["variant"] for r in runs if r["method"] == method}, key=COMPILE_VARIANTS.index):
            diff = max((r.get("max_weight_diff", 0.0) for r in runs if r["method"] == method and r["variant"] == variant))
            lines.append(f"| {method} | {variant} | {median('steady_ms', variant):.1f} | "
                         f"{median('steady_ms', variant) / median('steady_ms', 'eager'):.2f} | "
                         f"{median('first_step_s', variant):.2f} | {median('overhead_s', variant):.2f} | "
                         f"{median('graphs', variant):.0f} | {diff:.1e} |")
    table = "\n".join(lines)
    print(table)
    Path(a.out, "compile_cost.md").write_text(table + "\n")
    Path(a.out, "compile_cost.json").write_text(json.dumps(runs, indent=1))


def compile_arguments(parser) -> None:
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "VARIANT", "DIR"), help=argparse.SUPPRESS)


# --- fsdp: FSDP2 against DDP throughput ----------------------------------------------------------------------------

FSDP_METHODS = {"sam": dict(esam_beta=1.0, esam_gamma=1.0), "esam": dict(esam_selection="sharpness"),
                "esam_random": dict(esam_selection="random")}


def fsdp_worker(kind: str, out: str, steps: int, repeats: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))  # the test suite's FSDP-on-CPU switch and data
    from transformers import ViTConfig, ViTForImageClassification

    from esam_hf import ESAMTrainer, ESAMTrainingArguments
    from esam_hf.benchmark import _StepTimer
    from fsdp_case import enable_fsdp_on_cpu, leave_process_group
    from helpers import make_data

    cuda = torch.cuda.is_available()
    if kind == "fsdp" and not cuda:
        enable_fsdp_on_cpu()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch, warmup = (128 if cuda else 32), 2
    rates = {m: [] for m in FSDP_METHODS}
    for _ in range(repeats):
        for method, esam in FSDP_METHODS.items():
            torch.manual_seed(0)
            config = ViTConfig(hidden_size=256 if cuda else 96, num_hidden_layers=6 if cuda else 4, num_attention_heads=4,
                               intermediate_size=1024 if cuda else 384, image_size=32, patch_size=4, num_labels=10)
            args = ESAMTrainingArguments(
                output_dir=f"{out}/{kind}-{method}", per_device_train_batch_size=batch, max_steps=warmup + steps,
                optim="sgd", optim_args="momentum=0.9", learning_rate=0.01, lr_scheduler_type="constant",
                save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda,
                bf16=cuda, dataloader_num_workers=0, seed=0, esam_rho=0.05, **esam,
                **(dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"]})
                   if kind == "fsdp" else {}))
            trainer = ESAMTrainer(model=ViTForImageClassification(config), args=args,
                                  train_dataset=make_data(batch * world * (warmup + steps), num_classes=10, size=32))
            timer = _StepTimer(warmup, warmup + steps)
            trainer.add_callback(timer)
            trainer.train()
            rates[method].append(steps * batch * world / timer.seconds)
            sharded = type(next(trainer.model.parameters())).__name__ == "DTensor"
            if sharded != (kind == "fsdp"):  # a run labelled by what it did, not by what it was asked
                raise RuntimeError(f"asked for {kind}, but the parameters are {'' if sharded else 'not '}sharded")
    if int(os.environ.get("RANK", "0")) == 0:
        with open(f"{out}/{kind}.json", "w") as f:
            json.dump({"rates": rates, "world": world, "batch_per_rank": batch}, f)
    leave_process_group()


def fsdp_throughput(opts, parser) -> int:
    """ESAM's step cost under FSDP2 against DDP, through ESAMTrainer: SAM, the paper's ESAM and random
    selection, images/s of the same ViT at the same global batch, methods interleaved, median of repeats.

    Under DDP SWP skips the weight gradients of the tensors it does not perturb and the ascent communicates
    nothing; under FSDP2 the ascent is a full backward plus a reduce-scatter (see the README's table). This
    measures how much of ESAM's saving over SAM is left. On a CPU (--dry-run sizes, gloo, FSDP switched on by
    hand as in the tests) it shows the compute side only.

        python benchmarks/step_speed.py fsdp --out OUT [--processes N] [--steps S] [--repeats R]
    """
    if opts.worker:
        fsdp_worker(opts.worker, opts.out, opts.steps, opts.repeats)
        return 0

    world = opts.processes or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    os.makedirs(opts.out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GLOO_SOCKET_IFNAME": "lo"}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "processes": world,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for kind in ("ddp", "fsdp"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                        str(Path(__file__).resolve()), "fsdp", "--out", opts.out, "--steps", str(opts.steps),
                        "--repeats", str(opts.repeats), "--worker", kind], env=env, check=True)
        rates = json.load(open(f"{opts.out}/{kind}.json"))["rates"]
        report[kind] = {m: statistics.median(r) for m, r in rates.items()}
        report[kind]["esam/sam"] = statistics.median(e / s for e, s in zip(rates["esam"], rates["sam"]))
        report[kind]["esam_random/sam"] = statistics.median(e / s for e, s in zip(rates["esam_random"], rates["sam"]))
    json.dump(report, open(f"{opts.out}/fsdp_throughput.json", "w"), indent=2)
    print("| setup | SAM img/s | ESAM img/s | random img/s | ESAM/SAM | random/SAM |\n|---|---|---|---|---|---|")
    for kind in ("ddp", "fsdp"):
        r = report[kind]
        print(f"| {kind} | {r['sam']:.0f} | {r['esam']:.0f} | {r['esam_random']:.0f} | {r['esam/sam']:.2f} | "
              f"{r['esam_random/sam']:.2f} |")
    return 0


def fsdp_arguments(parser) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=None, help="Default: every GPU, or 2 on a CPU.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["fsdp", "ddp"], help=argparse.SUPPRESS)


# name -> (what it runs, its options, a line of help)
COMMANDS = {
    "bare": (bare, bare_arguments, "time and torch.profiler of the bare esam_hf.ESAM loop (no Trainer)"),
    "trainer": (trainer_vs_loop, trainer_arguments, "ESAMTrainer against the bare loop, process time per step"),
    "dispatches": (dispatches, dispatches_arguments, "operator dispatches per optimizer step"),
    "compile": (compile_cost, compile_arguments, "what torch_compile=True costs and saves"),
    "fsdp": (fsdp_throughput, fsdp_arguments, "FSDP2 against DDP, images/s through ESAMTrainer"),
}


def main(argv=None):
    return run_subcommand(__doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
