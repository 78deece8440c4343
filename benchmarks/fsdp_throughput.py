"""ESAM's step cost under FSDP2 against DDP, through ESAMTrainer: SAM, the paper's ESAM and random
selection, images/s of the same ViT at the same global batch, methods interleaved, median of repeats.

Under DDP SWP skips the weight gradients of the tensors it does not perturb and the ascent communicates
nothing; under FSDP2 the ascent is a full backward plus a reduce-scatter (see the README's table). This
measures how much of ESAM's saving over SAM is left. On a CPU (--dry-run sizes, gloo, FSDP switched on by
hand as in the tests) it shows the compute side only.

    python benchmarks/fsdp_throughput.py --out OUT [--processes N] [--steps S] [--repeats R]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

METHODS = {"sam": dict(esam_beta=1.0, esam_gamma=1.0), "esam": dict(esam_selection="sharpness"),
           "esam_random": dict(esam_selection="random")}


def worker(kind: str, out: str, steps: int, repeats: int) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from esam_hf import ESAMTrainer, ESAMTrainingArguments
    from esam_hf.benchmark import _StepTimer
    from fsdp_case import enable_fsdp_on_cpu
    from helpers import make_data

    cuda = torch.cuda.is_available()
    if kind == "fsdp" and not cuda:
        enable_fsdp_on_cpu()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch, warmup = (128 if cuda else 32), 2
    rates = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method, esam in METHODS.items():
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
        json.dump({"rates": rates, "world": world, "batch_per_rank": batch}, open(f"{out}/{kind}.json", "w"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=None, help="Default: every GPU, or 2 on a CPU.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["fsdp", "ddp"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.out, opts.steps, opts.repeats)
        return 0
    import torch

    world = opts.processes or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    os.makedirs(opts.out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GLOO_SOCKET_IFNAME": "lo"}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "processes": world,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for kind in ("ddp", "fsdp"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                        str(Path(__file__).resolve()), "--out", opts.out, "--steps", str(opts.steps), "--repeats",
                        str(opts.repeats), "--worker", kind], env=env, check=True)
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


if __name__ == "__main__":
    sys.exit(main())
