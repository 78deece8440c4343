"""Where a whole `esam-hf reproduce` run's training time goes beyond the steady-state steps that
`esam-hf bench` times: per-step clocks through whole runs, compared within the same runs.

Each run's training seconds (reproduce's epoch clock, evaluation excluded) against the sum of its step
times and against its median step x steps (what the bench's steady-state timing would predict). Their
ratios between methods are taken from the same runs, so the host's run-to-run drift cancels.

    python benchmarks/step_clock.py --out OUT [reproduce options, default: the demo recipe, 2 epochs, seeds 0,1]
"""

import json
import os
import statistics
import sys
import time

from transformers import TrainerCallback

import esam_hf.reproduce as reproduce

DEFAULT = ["--recipe", "demo", "--num_train_epochs", "2", "--seeds", "0,1", "--methods", "sgd,sam,esam,esam_random",
           "--plots", "false"]


class StepClock(TrainerCallback):
    """Wall time of every optimizer step and of every epoch, into OUTPUT_DIR/step_clock.json."""

    def __init__(self, path):
        self.path, self.steps, self.epochs = path, [], []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self.step_start)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs.append(time.perf_counter() - self.epoch_start)
        with open(self.path, "w") as f:
            json.dump({"steps": self.steps, "epochs": self.epochs}, f)


def summarize(root: str) -> dict:
    runs = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "step_clock.json")
        if os.path.isfile(path):
            clock = json.load(open(path))
            method = name.rsplit("-seed", 1)[0]
            steps = clock["steps"]
            runs.setdefault(method, []).append({"epoch_clock": sum(clock["epochs"]), "sum_of_steps": sum(steps),
                                                "median_step_x_steps": statistics.median(steps) * len(steps)})
    means = {m: {k: statistics.fmean(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    ratios = {}
    for num, den in [("esam", "sgd"), ("esam", "sam"), ("sam", "sgd"), ("esam_random", "sgd"), ("esam_random", "sam")]:
        if num in means and den in means:  # throughput ratio = time ratio inverted
            ratios[f"{num}/{den}"] = {k: means[den][k] / means[num][k] for k in means[num]}
    return {"seconds": means, "throughput_ratios": ratios}


def main(argv):
    out = argv[argv.index("--out") + 1]
    argv = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    train = reproduce.train_image_classifier

    def with_clock(*args, callbacks=None, **kwargs):
        clock = StepClock(os.path.join(args[2].output_dir, "step_clock.json"))
        return train(*args, callbacks=[*(callbacks or []), clock], **kwargs)

    reproduce.train_image_classifier = with_clock
    reproduce.main([*(argv or DEFAULT), "--output_dir", out])
    report = summarize(out)
    with open(os.path.join(out, "step_clock_summary.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("| ratio | whole run (epoch clock) | sum of step times | median step x steps (bench-like) | whole vs bench-like |")
    print("|---|---|---|---|---|")
    for name, r in report["throughput_ratios"].items():
        print(f"| {name} | {r['epoch_clock']:.3f} | {r['sum_of_steps']:.3f} | {r['median_step_x_steps']:.3f} | "
              f"{100 * (r['epoch_clock'] / r['median_step_x_steps'] - 1):+.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
