"""Profile optimizer steps inside a real `esam-hf train` run: the whole Trainer path (data loading, the ESAM
step, the non-finite guard, clipping, the optimizer, logging), not just the bare step of profile_step.py.

After `--skip` steps (compilation, cudnn autotuning and the first-batch checks out of the way), `--steps`
optimizer steps run under torch.profiler. Written to `--out`: trace.json (chrome://tracing or Perfetto), the
operator table (profile.txt) and profile.json: wall ms per step and, on a GPU, kernel ms per step and the
GPU's busy fraction (kernel time / wall time; well below 1 means the host, not the GPU, sets the pace).

    python benchmarks/profile_train.py --out DIR -- --recipe cifar10-resnet18 --dataset DATA --batch_size ...
    python benchmarks/profile_train.py --out DIR -- --recipe demo --max_steps 12 --output_dir /tmp/run
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback


class StepProfiler(TrainerCallback):
    """torch.profiler over optimizer steps skip+1 .. skip+steps of a Trainer run."""

    def __init__(self, out: str, skip: int, steps: int):
        self.out, self.skip, self.steps, self.prof = out, skip, steps, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.skip and self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._sync()
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == self.skip + self.steps:
            self._sync()
            wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            result = {"steps": self.steps, "after_step": self.skip, "wall_ms_per_step": wall / self.steps * 1e3,
                      "batch_per_device": args.per_device_train_batch_size, "device": _device()}
            if torch.cuda.is_available():
                kernel_us = sum(e.self_device_time_total for e in averages)
                result.update(gpu_kernel_ms_per_step=kernel_us / self.steps / 1e3, gpu_busy_fraction=kernel_us / 1e6 / wall)
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "profile.json"), "w") as f:
                json.dump(result, f, indent=1)
            with open(os.path.join(self.out, "profile.txt"), "w") as f:
                f.write(averages.table(sort_by="self_cuda_time_total" if torch.cuda.is_available()
                                       else "self_cpu_time_total", row_limit=40))
            self.prof.export_chrome_trace(os.path.join(self.out, "trace.json"))
            print(f"[profile_train] {json.dumps(result)}", flush=True)
            self.prof = None
            self.skip = -1  # once

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for trace.json, profile.txt and profile.json")
    p.add_argument("--skip", type=int, default=10, help="optimizer steps before profiling starts")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps profiled")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: the options of `esam-hf train`")
    args = p.parse_args(argv)
    if args.skip < 0 or args.steps < 1:
        p.error(f"--skip must be >= 0 and --steps >= 1, got {args.skip} and {args.steps}")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    from esam_hf.run import main as train

    train(train_args, callbacks=[StepProfiler(args.out, args.skip, args.steps)])
    if not os.path.isfile(os.path.join(args.out, "profile.json")):
        raise SystemExit(f"profile_train: the run ended before step {args.skip + args.steps}; nothing was profiled "
                         "(lower --skip/--steps or train longer)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
