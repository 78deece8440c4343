"""Time and profile one optimizer step of SGD, SAM and ESAM in a plain PyTorch loop (no Trainer).

Methods are interleaved, median of --repeats (5) repeats of --steps (5) steps; then a torch.profiler table of three
steps of the recommended mode (selection "ascent"), SAM and the paper's ESAM and, on a GPU, how busy
the GPU was during them (kernel time / wall time: well below 1 means the step is launch- or
host-bound, not compute-bound).

    python benchmarks/profile_step.py                      # CPU: quarter-width cifar_resnet18, batch 64
    python benchmarks/profile_step.py --batch 128          # GPU: full-width cifar_resnet18, batch 128, fp32
"""
import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import esam_hf.models  # noqa: F401  (registers cifar_resnet18)
from esam_hf import ESAM

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 64 on CPU")
parser.add_argument("--bf16", action="store_true")
parser.add_argument("--channels_last", action="store_true")
parser.add_argument("--model", default="cifar_resnet18")
parser.add_argument("--json", default=None, help="also write the timings here")
parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (the median is reported)")
parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
parser.add_argument("--trace", default=None, help="write chrome traces of the profiled steps here (NAME.json gives "
                    "NAME-<method>.json)")
args = parser.parse_args()

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


methods = {"sgd": None, "sam": ESAM(model, rho=0.05, beta=1, gamma=1), "esam": ESAM(model, rho=0.05, beta=0.6, gamma=0.5),
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
                     "esam_ascent/sgd": med["sgd"] / med["esam_ascent"], "esam_ascent/sam": med["sam"] / med["esam_ascent"]}}

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
