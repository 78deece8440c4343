"""What `torch_compile=True` costs and saves with ESAMTrainer: compile time, recompiles, steady-state step
time, compiled against eager, for plain training (esam_rho=0), the defaults (random selection) and the
paper's ESAM (sharpness selection), on a small ViT (`problem_type` set, so that transformers' loss does
not recompile by setting it). Variants: eager; compiled (ESAMTrainer marks the batch dimension dynamic,
so SDS's k-row subsets reuse the B-row graph); compiled with a static batch (that marking off: the SDS
subset recompiles). Each run is a fresh process (dynamo's caches are per process), runs are interleaved
repeat by repeat, and times are process time (inductor compiles in the process:
TORCHINDUCTOR_COMPILE_THREADS=1, and the C++ compiler it runs is counted too), on one thread (a CPU-time
clock on a shared machine: idle OpenMP workers would spin and count), reported as medians over repeats.

    python benchmarks/compile_cost.py --out OUT [--steps S] [--repeats R] [--backend inductor]

Per run: the first step (where the graphs are compiled), the steady-state ms/step (median of the last half
of the steps), the compile overhead (the run's step time beyond steps x steady state), the graphs dynamo
compiled and why it recompiled, and the largest difference of the final weights from the eager run of
the same method (same seed, same batches).
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"plain": dict(esam_rho=0.0), "defaults": {}, "paper": dict(esam_rho=0.05, esam_selection="sharpness")}


VARIANTS = ("eager", "compiled", "static")


def worker(method: str, variant: str, backend: str, steps: int, out: str) -> None:
    import torch
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
        torch_compile_backend=backend if compiled else None, **METHODS[method])  # a backend alone turns compile on
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "VARIANT", "DIR"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.steps < 4 or a.repeats < 1:
        parser.error("--steps must be >= 4 and --repeats >= 1")
    if a.worker:
        method, variant, out = a.worker
        return worker(method, variant, a.backend, a.steps, out)
    if not a.out:
        parser.error("--out is required")
    import torch

    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = []
    for repeat in range(a.repeats):
        for method in METHODS:
            for variant in VARIANTS if method != "plain" else VARIANTS[:2]:  # plain training takes no subsets
                out = Path(a.out) / f"r{repeat}_{method}_{variant}"
                out.mkdir(parents=True, exist_ok=True)
                # A fresh inductor cache per run: every run compiles cold, as a first run does.
                subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--backend", a.backend,
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
    lines = [f"| method | variant | ms/step | /eager | first step s | compile overhead s | graphs | max weight diff "
             f"from eager |", "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        def median(key, variant):
            return statistics.median(r[key] for r in runs if r["method"] == method and r["variant"] == variant)
        for variant in sorted({r["variant"] for r in runs if r["method"] == method}, key=VARIANTS.index):
            diff = max((r.get("max_weight_diff", 0.0) for r in runs if r["method"] == method and r["variant"] == variant))
            lines.append(f"| {method} | {variant} | {median('steady_ms', variant):.1f} | "
                         f"{median('steady_ms', variant) / median('steady_ms', 'eager'):.2f} | "
                         f"{median('first_step_s', variant):.2f} | {median('overhead_s', variant):.2f} | "
                         f"{median('graphs', variant):.0f} | {diff:.1e} |")
    table = "\n".join(lines)
    print(table)
    Path(a.out, "compile_cost.md").write_text(table + "\n")
    Path(a.out, "compile_cost.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
