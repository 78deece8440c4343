"""Training throughput of the plain Trainer (SGD) against ESAMTrainer as SAM and as ESAM.

Every method trains the same model, data pipeline, batch and precision through the Trainer, as a
real run does (data loading, epoch boundaries, logging). Methods are interleaved repeat by repeat,
so drift in clocks, temperature or a shared host's load hits all of them; each ratio is taken
within a repeat, and its median and range over repeats are reported. By default a repeat times a
whole epoch of the data on CPU (200 steps on a GPU), so what the benchmark says is what a training
run sees. Also measured: peak device memory per method and the input pipeline's own images/s.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback

from .data import measure_pipeline_throughput
from .run import DataArguments, ModelArguments, make_trainer
from .run_folder import write_json
from .trainer import ESAMTrainer, ESAMTrainingArguments


@dataclass
class Setting:
    name: str
    model: str
    batch_size: int
    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = False
    model_kwargs: dict = field(default_factory=dict)


GPU_SETTINGS = [
    Setting("cifar_resnet18 b128 fp32", "cifar_resnet18", 128),
    Setting("cifar_resnet18 b512 bf16 channels_last", "cifar_resnet18", 512, "bf16", True),
    Setting("cifar_wrn28_10 b128 bf16", "cifar_wrn28_10", 128, "bf16", True),
]
# Without a GPU: the same comparison at a size two CPU cores finish in minutes.
CPU_SETTINGS = [Setting("cifar_resnet18 (1/4 width) b64 fp32 [CPU]", "cifar_resnet18", 64,
                        model_kwargs={"channels": [16, 32, 64, 128]})]

# name -> (trainer class, ESAM arguments); beta/gamma are the ResNet-18 recipe's. As in `reproduce`, "esam" is the
# paper's ESAM (sharpness selection), "esam_random" a random subset for the descent, "esam_ascent" for the ascent.
METHODS = {
    "sgd": (Trainer, {"esam_rho": 0.0}),
    "esam_rho0": (ESAMTrainer, {"esam_rho": 0.0}),
    "sam": (ESAMTrainer, {"esam_beta": 1.0, "esam_gamma": 1.0}),
    "esam": (ESAMTrainer, {"esam_beta": 0.6, "esam_gamma": 0.5, "esam_selection": "sharpness"}),
    "esam_gamma_warmup": (ESAMTrainer, {"esam_beta": 0.6, "esam_gamma": 0.5, "esam_selection": "sharpness",
                                        "esam_gamma_warmup": 0.3}),
    "esam_random": (ESAMTrainer, {"esam_beta": 0.6, "esam_gamma": 0.5, "esam_selection": "random"}),
    "esam_ascent": (ESAMTrainer, {"esam_beta": 0.6, "esam_gamma": 0.5, "esam_selection": "ascent"}),
}


class _StepTimer(TrainerCallback):
    """Wall and process (CPU) time from the end of step `start` to the end of step `stop`,
    device-synchronised only at those two points so the steps in between run as in real training."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.seconds, self.cpu_seconds = start, stop, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.start, self.stop):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == self.start:
                self._t0, self._c0 = time.perf_counter(), time.process_time()
            else:
                self.seconds = time.perf_counter() - self._t0
                self.cpu_seconds = time.process_time() - self._c0


def _trainer(setting: Setting, method: str, dataset: str, steps: int, warmup: int, out_dir: str, workers: int):
    trainer_cls, esam = METHODS[method]
    args = ESAMTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=setting.batch_size, max_steps=warmup + steps,
        learning_rate=0.05, weight_decay=5e-4, optim="sgd", lr_scheduler_type="constant", bf16=setting.precision == "bf16",
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=workers, dataloader_pin_memory=torch.cuda.is_available(), seed=0,
        dataloader_persistent_workers=workers > 0,  # as a long run: workers are not restarted every epoch
        use_cpu=not torch.cuda.is_available(), **esam,
    )
    model_args = ModelArguments(setting.model, model_kwargs=json.dumps(setting.model_kwargs) if setting.model_kwargs else None,
                                channels_last=setting.channels_last)
    return make_trainer(model_args, DataArguments(dataset=dataset, max_eval_samples=1), args, trainer_cls=trainer_cls)


RATIOS = [("esam", "sgd"), ("sam", "sgd"), ("esam", "sam"), ("esam_rho0", "sgd"), ("esam_gamma_warmup", "sgd"),
          ("esam_gamma_warmup", "sam"), ("esam_random", "sgd"), ("esam_random", "sam"), ("esam_ascent", "sgd"),
          ("esam_ascent", "sam")]


def run_setting(setting: Setting, methods: list[str], dataset: str, steps: int | None, warmup: int, repeats: int,
                workers: int) -> dict:
    """Images/s of each method (median, min, max over repeats) and each ratio taken within a repeat."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for m in methods:
            trainers[m] = _trainer(setting, m, dataset, steps or 1, warmup, os.path.join(tmp, m), workers)
        any_trainer = next(iter(trainers.values()))
        epoch_steps = len(any_trainer.get_train_dataloader())
        steps = steps or epoch_steps
        for trainer in trainers.values():
            trainer.args.max_steps = warmup + steps
        pipeline = measure_pipeline_throughput(any_trainer.train_dataset, any_trainer.data_collator,
                                               setting.batch_size, num_batches=min(steps, 20), num_workers=workers)
        rates = {m: [] for m in methods}
        cpu_rates = {m: [] for m in methods}
        memory = {}
        for repeat in range(repeats):
            for method, trainer in trainers.items():
                timer = _StepTimer(warmup, warmup + steps)
                trainer.add_callback(timer)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                trainer.train()
                trainer.remove_callback(timer)
                rates[method].append(steps * setting.batch_size / timer.seconds)
                cpu_rates[method].append(steps * setting.batch_size / timer.cpu_seconds)
                if torch.cuda.is_available():
                    memory[method] = max(memory.get(method, 0), torch.cuda.max_memory_allocated() / 2**20)
            print(f"[bench] {setting.name}, repeat {repeat + 1}/{repeats}: "
                  + ", ".join(f"{m} {r[-1]:.0f} img/s" for m, r in rates.items()), flush=True)
    result = {"setting": setting.name, "batch_size": setting.batch_size, "precision": setting.precision,
              "timed_steps": steps, "epoch_steps": epoch_steps, "pipeline_images_per_s": pipeline,
              "images_per_s": {m: statistics.median(r) for m, r in rates.items()},
              "all_images_per_s": rates, "all_images_per_cpu_s": cpu_rates, "peak_memory_mib": memory or None}
    result["ratios"] = _ratios(rates)
    result["cpu_time_ratios"] = _ratios(cpu_rates)
    if "sgd" in rates:
        result["ratios"]["pipeline/sgd"] = {"median": pipeline / result["images_per_s"]["sgd"]}
    return result


def _ratios(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    # Within a repeat the methods ran back to back, so their ratio is free of slow drift between repeats.
    out = {}
    for a, b in RATIOS:
        if a in rates and b in rates:
            per_repeat = [x / y for x, y in zip(rates[a], rates[b])]
            out[f"{a}/{b}"] = {"median": statistics.median(per_repeat), "min": min(per_repeat), "max": max(per_repeat)}
    return out


def environment() -> dict:
    import timm
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
    }


def markdown(results: list[dict], env: dict, repeats: int) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, timm {env['timm']}; "
             f"{env['date']}. Median over {repeats} interleaved repeats; ratios taken within each repeat, "
             "median [min-max].", ""]
    methods = list(results[0]["images_per_s"])
    shown = [k for k in ("esam_ascent/sgd", "esam_ascent/sam", "esam/sgd", "sam/sgd", "esam/sam", "esam_random/sgd",
                         "esam_random/sam", "esam_rho0/sgd") if k in results[0]["ratios"]]

    def header(ratio):  # ESAM/SAM, ascent/SAM, random/SGD
        return "/".join(m.removeprefix("esam_") if m.startswith("esam_") else m.upper() for m in ratio.split("/"))

    lines.append("| setting | timed steps | " + " | ".join(f"{m} img/s" for m in methods) + " | "
                 + " | ".join(header(k) for k in shown) + " | pipeline img/s |")
    lines.append("|---" * (len(methods) + len(shown) + 3) + "|")
    for r in results:
        cells = [str(r["timed_steps"])] + [f"{r['images_per_s'][m]:.0f}" for m in methods]
        cells += [_ratio_cell(r["ratios"][k]) for k in shown]
        cells.append(f"{r['pipeline_images_per_s']:.0f}")
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    if not torch.cuda.is_available():
        lines += ["", "The same ratios from process (CPU) time, which a busy shared host disturbs less:", "",
                  "| setting | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for r in results:
            lines.append(f"| {r['setting']} | " + " | ".join(_ratio_cell(r["cpu_time_ratios"][k]) for k in shown) + " |")
    if results[0]["peak_memory_mib"]:
        lines += ["", "| setting | " + " | ".join(f"{m} peak MiB" for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for r in results:
            lines.append(f"| {r['setting']} | " + " | ".join(f"{r['peak_memory_mib'][m]:.0f}" for m in methods) + " |")
    return "\n".join(lines)


def _ratio_cell(q: dict) -> str:
    return f"{q['median']:.2f} [{q['min']:.2f}-{q['max']:.2f}]"


@dataclass
class BenchArguments:
    _argument_group_name = "bench"
    methods: str = field(default=",".join(METHODS), metadata={"help": f"Comma-separated, of {', '.join(METHODS)}."})
    settings: str | None = field(default=None, metadata={
        "help": "Comma-separated setting names or indices (default: all). GPU: "
                + "; ".join(f"{i} {s.name}" for i, s in enumerate(GPU_SETTINGS)) + ". CPU: "
                + "; ".join(f"{i} {s.name}" for i, s in enumerate(CPU_SETTINGS)) + "."})
    dataset: str = field(default="cifar10-subset", metadata={"help": "CIFAR-kind dataset feeding the pipeline."})
    steps: int | None = field(default=None, metadata={
        "help": "Timed steps per repeat (default: one epoch of the dataset on CPU, 200 on a GPU)."})
    warmup: int | None = field(default=None, metadata={"help": "Untimed steps first (default 2 on CPU, 10 on a GPU)."})
    repeats: int = field(default=3, metadata={"help": "Interleaved repeats (the median and range are reported)."})
    workers: int | None = field(default=None, metadata={"help": "Dataloader workers (default 0 on CPU, 4 on a GPU)."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Folder for throughput.json and throughput.md."})

    def __post_init__(self):
        self.method_list = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not self.method_list:
            raise ValueError(f"--methods: name at least one of {', '.join(METHODS)}")
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        for name, value, low in (("steps", self.steps, 1), ("warmup", self.warmup, 0), ("repeats", self.repeats, 1),
                                 ("workers", self.workers, 0)):
            if value is not None and value < low:
                raise ValueError(f"--{name} must be >= {low}, got {value}")

    def setting_list(self, available: list[Setting]) -> list[Setting]:
        if not self.settings:
            return list(available)
        chosen = []
        for item in (s.strip() for s in self.settings.split(",")):
            match = [s for i, s in enumerate(available) if item in (str(i), s.name)]
            if not match:
                raise ValueError(f"--settings: {item!r} is not a setting here; choose indices 0-{len(available) - 1} "
                                 "or names of: " + "; ".join(s.name for s in available))
            chosen += match
        return chosen


def main(argv: list[str] | None = None) -> list[dict]:
    from .arguments import make_parser, parse_args

    parser = make_parser([BenchArguments], prog="esam-hf bench", description=__doc__.split("\n\n")[0])
    (args,) = parse_args(parser, argv)
    gpu = torch.cuda.is_available()
    try:
        settings = args.setting_list(GPU_SETTINGS if gpu else CPU_SETTINGS)
    except ValueError as e:
        parser.error(str(e))
    if not gpu:
        print("No GPU: running the CPU-sized setting (quarter-width ResNet-18, batch 64); GPU numbers need a GPU.")
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    steps = args.steps or (200 if gpu else None)  # None: one epoch
    workers = args.workers if args.workers is not None else (4 if gpu else 0)
    results = []
    for setting in settings:
        results.append(run_setting(setting, args.method_list, args.dataset, steps, warmup, args.repeats, workers))
        print(json.dumps({k: round(v["median"], 3) for k, v in results[-1]["ratios"].items()}), flush=True)
    env = environment()
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "throughput.json"),
               {"environment": env, "warmup": warmup, "repeats": args.repeats, "results": results})
    table = markdown(results, env, args.repeats)
    with open(os.path.join(args.output_dir, "throughput.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results
