"""Training throughput of the plain Trainer (SGD) against ESAMTrainer as SAM and as ESAM.

Every method trains the same model, data pipeline, batch and precision; methods are
interleaved repeat by repeat (so drift in clocks or temperature hits all of them), the
warm-up steps are excluded, and the median over repeats is reported. Also measured: peak
device memory per method and the input pipeline's own images/s.
"""

from __future__ import annotations

import argparse
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

# name -> (trainer class, ESAM arguments); beta/gamma of "esam" are the ResNet-18 recipe's.
METHODS = {
    "sgd": (Trainer, {"esam_rho": 0.0}),
    "esam_rho0": (ESAMTrainer, {"esam_rho": 0.0}),
    "sam": (ESAMTrainer, {"esam_beta": 1.0, "esam_gamma": 1.0}),
    "esam": (ESAMTrainer, {"esam_beta": 0.6, "esam_gamma": 0.5}),
    "esam_gamma_warmup": (ESAMTrainer, {"esam_beta": 0.6, "esam_gamma": 0.5, "esam_gamma_warmup": 0.3}),
    "esam_random": (ESAMTrainer, {"esam_beta": 0.6, "esam_gamma": 0.5, "esam_selection": "random"}),
}


class _StepTimer(TrainerCallback):
    """Wall time from the end of step `start` to the end of step `stop`, device-synchronised
    only at those two points so the steps in between run as in real training."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.seconds = start, stop, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.start, self.stop):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == self.start:
                self._t0 = time.perf_counter()
            else:
                self.seconds = time.perf_counter() - self._t0


def _trainer(setting: Setting, method: str, dataset: str, steps: int, warmup: int, out_dir: str, workers: int):
    trainer_cls, esam = METHODS[method]
    args = ESAMTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=setting.batch_size, max_steps=warmup + steps,
        learning_rate=0.05, weight_decay=5e-4, optim="sgd", lr_scheduler_type="constant", bf16=setting.precision == "bf16",
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=workers, dataloader_pin_memory=torch.cuda.is_available(), seed=0,
        use_cpu=not torch.cuda.is_available(), **esam,
    )
    model_args = ModelArguments(setting.model, model_kwargs=json.dumps(setting.model_kwargs) if setting.model_kwargs else None,
                                channels_last=setting.channels_last)
    return make_trainer(model_args, DataArguments(dataset=dataset, max_eval_samples=1), args, trainer_cls=trainer_cls)


def run_setting(setting: Setting, methods: list[str], dataset: str, steps: int, warmup: int, repeats: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: _trainer(setting, m, dataset, steps, warmup, os.path.join(tmp, m), workers) for m in methods}
        any_trainer = next(iter(trainers.values()))
        pipeline = measure_pipeline_throughput(any_trainer.train_dataset, any_trainer.data_collator,
                                               setting.batch_size, num_batches=min(steps, 20), num_workers=workers)
        rates = {m: [] for m in methods}
        memory = {}
        for _ in range(repeats):
            for method, trainer in trainers.items():
                timer = _StepTimer(warmup, warmup + steps)
                trainer.add_callback(timer)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                trainer.train()
                trainer.remove_callback(timer)
                rates[method].append(steps * setting.batch_size / timer.seconds)
                if torch.cuda.is_available():
                    memory[method] = max(memory.get(method, 0), torch.cuda.max_memory_allocated() / 2**20)
    result = {"setting": setting.name, "batch_size": setting.batch_size, "precision": setting.precision,
              "pipeline_images_per_s": pipeline,
              "images_per_s": {m: statistics.median(r) for m, r in rates.items()},
              "all_images_per_s": rates, "peak_memory_mib": memory or None}
    ips = result["images_per_s"]
    ratios = {}
    for a, b in [("esam", "sgd"), ("sam", "sgd"), ("esam", "sam"), ("esam_rho0", "sgd"),
                 ("esam_gamma_warmup", "sgd"), ("esam_gamma_warmup", "sam"), ("esam_random", "sgd"),
                 ("esam_random", "sam")]:
        if a in ips and b in ips:
            ratios[f"{a}/{b}"] = ips[a] / ips[b]
    if "sgd" in ips:
        ratios["pipeline/sgd"] = pipeline / ips["sgd"]
    result["ratios"] = ratios
    return result


def environment() -> dict:
    import timm
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
    }


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, timm {env['timm']}; {env['date']}.", ""]
    methods = list(results[0]["images_per_s"])
    lines.append("| setting | " + " | ".join(f"{m} img/s" for m in methods) + " | ESAM/SGD | SAM/SGD | ESAM/SAM | rho0/SGD | pipeline img/s |")
    lines.append("|---" * (len(methods) + 6) + "|")
    for r in results:
        ips, q = r["images_per_s"], r["ratios"]
        cells = [f"{ips[m]:.0f}" for m in methods]
        cells += [f"{q.get(k, float('nan')):.2f}" for k in ("esam/sgd", "sam/sgd", "esam/sam", "esam_rho0/sgd")]
        cells.append(f"{r['pipeline_images_per_s']:.0f}")
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    if results[0]["peak_memory_mib"]:
        lines += ["", "| setting | " + " | ".join(f"{m} peak MiB" for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for r in results:
            lines.append(f"| {r['setting']} | " + " | ".join(f"{r['peak_memory_mib'][m]:.0f}" for m in methods) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="esam-hf bench", description=__doc__)
    parser.add_argument("--dataset", default="cifar10-subset", help="CIFAR-kind dataset feeding the pipeline")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--settings", default=None, help="comma-separated indices into the settings list (default all)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 30 on GPU, 4 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on GPU, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default 4 on GPU, 0 on CPU)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for throughput.json and throughput.md")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    settings = GPU_SETTINGS if gpu else CPU_SETTINGS
    if args.settings:
        settings = [settings[int(i)] for i in args.settings.split(",")]
    if not gpu:
        print("No GPU: running the CPU-sized setting (quarter-width ResNet-18, batch 64); GPU numbers need a GPU.")
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    steps, warmup = args.steps or (30 if gpu else 4), args.warmup or (10 if gpu else 2)
    workers = args.workers if args.workers is not None else (4 if gpu else 0)
    results = []
    for setting in settings:
        results.append(run_setting(setting, methods, args.dataset, steps, warmup, args.repeats, workers))
        print(json.dumps(results[-1]["ratios"]), flush=True)
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump({"environment": env, "steps": steps, "warmup": warmup, "repeats": args.repeats, "results": results}, f, indent=2)
    table = markdown(results, env)
    with open(os.path.join(args.out, "throughput.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results
