"""How fast is a whole training run?

Subcommands (`python benchmarks/run_speed.py COMMAND --help` for each one's options):

    profile   torch.profiler over optimizer steps inside a real `esam-hf train` (the whole Trainer path)
              python benchmarks/run_speed.py profile --out DIR -- --recipe demo --max_steps 12 --output_dir /tmp/run
    demo      how long the README's demo takes, idle and beside other work (wall and process time)
              python benchmarks/run_speed.py demo --max_steps 60 --modes auto,all

Whole-epoch throughput, methods interleaved through the Trainer and its data pipeline, is `esam-hf bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from subcommands import run_subcommand  # benchmarks/ is on sys.path when a script runs


# --- profile: torch.profiler over steps of a real esam-hf train ----------------------------------------------------

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


def profile_train(args, parser) -> None:
    """Profile optimizer steps inside a real `esam-hf train` run: the whole Trainer path (data loading, the ESAM
    step, the non-finite guard, clipping, the optimizer, logging), not just the bare step of
    `step_speed.py bare`.

    After `--skip` steps (compilation, cudnn autotuning and the first-batch checks out of the way), `--steps`
    optimizer steps run under torch.profiler. Written to `--out`: trace.json (chrome://tracing or Perfetto), the
    operator table (profile.txt) and profile.json: wall ms per step and, on a GPU, kernel ms per step and the
    GPU's busy fraction (kernel time / wall time; well below 1 means the host, not the GPU, sets the pace).

        python benchmarks/run_speed.py profile --out DIR -- --recipe cifar10-resnet18 --dataset DATA --batch_size ...
        python benchmarks/run_speed.py profile --out DIR -- --recipe demo --max_steps 12 --output_dir /tmp/run
    """
    if args.skip < 0 or args.steps < 1:
        parser.error(f"--skip must be >= 0 and --steps >= 1, got {args.skip} and {args.steps}")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    from esam_hf.run import main as train

    train(train_args, callbacks=[StepProfiler(args.out, args.skip, args.steps)])
    if not os.path.isfile(os.path.join(args.out, "profile.json")):
        raise SystemExit(f"profile_train: the run ended before step {args.skip + args.steps}; nothing was profiled "
                         "(lower --skip/--steps or train longer)")


def profile_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder for trace.json, profile.txt and profile.json")
    parser.add_argument("--skip", type=int, default=10, help="optimizer steps before profiling starts")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps profiled")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: the options of `esam-hf train`")


# --- demo: how long the README's demo takes ------------------------------------------------------------------------

SPIN = "while True: pass"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(folder: Path, mode: str, max_steps: int | None, cores: int) -> dict:
    out = folder / "demo"
    command = ["esam-hf", "train", "--recipe", "demo", "--output_dir", str(out), "--disable_tqdm", "true"]
    command += ["--max_steps", str(max_steps)] if max_steps else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    if mode == "all":
        env["OMP_NUM_THREADS"] = str(cores)
    load = os.getloadavg()[0]
    cpu, start = cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall, process = time.perf_counter() - start, cpu_seconds() - cpu
    if done.returncode != 0:
        raise SystemExit(f"demo failed ({mode}):\n{done.stderr[-3000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    final = json.loads((out / "all_results.json").read_text())
    timeline = json.loads((out / "timeline.json").read_text())["epochs"]
    in_training_evals = sum(h["eval_runtime"] for h in history if "eval_runtime" in h)
    steps = timeline[-1]["train_seconds"]
    evaluation = in_training_evals + final.get("eval_runtime", 0.0)
    threads = next((line for line in done.stderr.splitlines() if "CPU thread" in line), "")
    return {"mode": mode, "wall_s": wall, "process_s": process, "load_before": load, "steps_s": steps,
            "evaluation_s": evaluation, "other_s": wall - steps - evaluation, "top1": final.get("eval_accuracy"),
            "threads_message": threads}


def demo_time(opts, parser) -> list[dict]:
    """How long the README's demo takes, idle and beside other work: wall and process time, median of repeats.

        # the full demo, idle and at load 4 (~30 min on 2 cores)
        python benchmarks/run_speed.py demo
        # shortened, the thread choice against torch's default
        python benchmarks/run_speed.py demo --max_steps 60 --modes auto,all

    Each run is `esam-hf train --recipe demo` in a fresh folder, as the README runs it. `--background 0,4` runs
    the demo with no busy process started by this script, then beside 4 (`python -c "while True: pass"`, killed
    when it ends): on 2 idle cores that is a load of about 4-5 with the demo, what a shared machine sees. Modes:
    `auto` is esam-hf's default (intra-op threads = the cores free when it starts); `all` sets OMP_NUM_THREADS to
    every core, torch's own default and esam-hf's before it chose. Start it on an otherwise idle machine: the
    load average before each run is recorded, and so is everything else that ran (other processes' CPU share).

    Where the time goes is read from each run's files: training steps (timeline.json: each epoch from its start
    to its end), evaluations (the Trainer's eval_runtime, at every epoch's end and once at the end) and the rest
    (start-up, data, saving). Writes benchmarks/results/demo_time.{json,md} (or --out).
    """
    modes = opts.modes.split(",")
    unknown = set(modes) - {"auto", "all"}
    if unknown or opts.repeats < 1:
        parser.error(f"--modes takes auto and/or all (got {sorted(unknown)}); --repeats >= 1")
    backgrounds = [int(b) for b in opts.background.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    results = []
    for background in backgrounds:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(background)]
        try:
            time.sleep(5 if spinners else 0)  # let the spinners start before the demo measures the cores free
            # Interleaved, so a change in the machine's other load hits every mode alike.
            for repeat in range(opts.repeats):
                for mode in modes:
                    if background == 0 and mode == "all" and "auto" in modes:
                        continue  # idle, esam-hf uses every core anyway
                    with tempfile.TemporaryDirectory() as folder:
                        run = {"background": background, "repeat": repeat,
                               **one_run(Path(folder), mode, opts.max_steps, cores)}
                    results.append(run)
                    print(json.dumps(run), flush=True)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    summary = []
    for background in backgrounds:
        for mode in modes:
            runs = [r for r in results if r["background"] == background and r["mode"] == mode]
            if runs:
                summary.append({"background": background, "mode": mode, "runs": len(runs),
                                **{k: statistics.median(r[k] for r in runs)
                                   for k in ("wall_s", "process_s", "steps_s", "evaluation_s", "other_s", "load_before")}})
    environment = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": cores,
                   "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                   "max_steps": opts.max_steps or "whole demo (10 epochs)"}
    lines = [f"Demo time ({environment['max_steps']}), {cores} cores, {environment['date']}; median of "
             f"{opts.repeats} runs; seconds.", "",
             "| busy processes beside it | threads | wall | process | training steps | evaluation | other | load before |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['background']} | {s['mode']} | {s['wall_s']:.0f} | {s['process_s']:.0f} | {s['steps_s']:.0f} | "
                     f"{s['evaluation_s']:.0f} | {s['other_s']:.0f} | {s['load_before']:.1f} |")
    os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)
    Path(opts.out + ".json").write_text(json.dumps({"environment": environment, "summary": summary, "runs": results},
                                                   indent=2))
    Path(opts.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def demo_arguments(parser) -> None:
    parser.add_argument("--max_steps", type=int, default=None, help="Cut the demo to this many steps (default: whole).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="auto", help="auto (esam-hf's thread choice), all (every core), or both.")
    parser.add_argument("--background", default="0,4", help="Busy processes to start beside the demo, per setting.")
    parser.add_argument("--out", default="benchmarks/results/demo_time")


# name -> (what it runs, its options, a line of help)
COMMANDS = {
    "profile": (profile_train, profile_arguments, "torch.profiler over steps inside a real `esam-hf train`"),
    "demo": (demo_time, demo_arguments, "how long the README's demo takes, idle and beside other work"),
}


def main(argv=None):
    return run_subcommand(__doc__, COMMANDS, argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
