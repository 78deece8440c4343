"""Rewrite a `reproduce` folder's results.md, results.json and plots with today's code, from the runs'
saved records alone (esam_run.json, timeline.json, all_results.json in each <method>-seed<seed>/), for
folders whose runs cannot be re-run here (e.g. GPU runs copied back without checkpoints). A tool, not a
measurement: it regenerates result tables and figures from saved records and trains nothing.

    python benchmarks/rewrite_results.py FOLDER [--eval_samples N]
    python benchmarks/rewrite_results.py FOLDER --figures_only

The recipe, model, dataset, batch and learning rate come from the records, the device and versions
from the folder's previous results.json. --eval_samples fills in the test-set size for records written
before runs stored it (state where the number comes from when you use it). --figures_only redraws only
the figures, from the folder's results.json and landscape.json (for folders whose run records are gone):
the numbers stay as they were written.
"""

import argparse
import json
import os
import re

from esam_hf.reproduce import load_run, write_summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--eval_samples", type=int, default=None)
    parser.add_argument("--figures_only", action="store_true")
    opts = parser.parse_args(argv)
    if opts.figures_only:
        return redraw_figures(opts.folder)
    loaded, records = {}, []
    for name in sorted(os.listdir(opts.folder)):
        match = re.fullmatch(r"(.+)-seed(\d+)", name)
        path = os.path.join(opts.folder, name)
        if match and os.path.isfile(os.path.join(path, "esam_run.json")):
            loaded.setdefault(match.group(1), {})[int(match.group(2))] = load_run(path)
            records.append(json.load(open(os.path.join(path, "esam_run.json"))))
    if not records:
        parser.error(f"{opts.folder} holds no <method>-seed<seed>/esam_run.json")
    order = ["sgd", "sam", "esam", "esam_warmup", "esam_random"]
    loaded = dict(sorted(loaded.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    settings = records[0]["settings"]
    training = settings["training"]
    batch = training["per_device_train_batch_size"] * settings["world_size"] * training["gradient_accumulation_steps"]
    previous = os.path.join(opts.folder, "results.json")
    env = json.load(open(previous))["environment"] if os.path.isfile(previous) else {"device": "?"}
    write_summary(opts.folder, loaded, recipe=records[0]["recipe"].split(" (")[0], model=settings["model"]["model_name"],
                  dataset=settings["data"]["dataset"], batch=batch, learning_rate=training["learning_rate"], env=env,
                  eval_samples=opts.eval_samples)


def redraw_figures(folder: str) -> list[str]:
    """The accuracy/loss curves from results.json's runs and the landscape figures from landscape.json."""
    from esam_hf.landscape import plot_landscape_1d, plot_landscape_2d
    from esam_hf.reproduce import plot_curves

    drawn = []
    results_path = os.path.join(folder, "results.json")
    if os.path.isfile(results_path):
        results = json.load(open(results_path))
        # Records of the earliest version carry no status: a run with a timeline finished it.
        runs = {m: {int(s): {"status": "finished", **r} for s, r in by.items() if r.get("timeline")}
                for m, by in results["runs"].items()}
        epochs = results["epochs"]  # the earliest records hold a float
        epochs = f"{epochs:g}" if isinstance(epochs, (int, float)) else epochs
        title = f"{results['recipe']}: {results['model']} on {results['dataset']}, {epochs} epochs"
        drawn += plot_curves(runs, folder, title)
    landscape_path = os.path.join(folder, "landscape.json")
    if os.path.isfile(landscape_path):
        models = json.load(open(landscape_path))["models"]
        drawn.append(plot_landscape_1d({n: (m["landscape_1d"]["alphas"], m["landscape_1d"]["losses"]) for n, m in models.items()},
                                       os.path.join(folder, "landscape_1d.png"),
                                       eigenvalues={n: m["top_hessian_eigenvalue"] for n, m in models.items()}))
        surfaces = {n: (m["landscape_2d"].get("alphas_1", m["landscape_2d"].get("alphas")),
                        m["landscape_2d"].get("alphas_2", m["landscape_2d"].get("betas")), m["landscape_2d"]["losses"])
                    for n, m in models.items() if "landscape_2d" in m}
        if surfaces:
            drawn.append(plot_landscape_2d(surfaces, os.path.join(folder, "landscape_2d.png")))
    print("\n".join(drawn))
    return drawn


if __name__ == "__main__":
    main()
