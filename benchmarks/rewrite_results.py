"""Rewrite a `reproduce` folder's results.md, results.json and plots with today's code, from the runs'
saved records alone (esam_run.json, timeline.json, all_results.json in each <method>-seed<seed>/), for
folders whose runs cannot be re-run here (e.g. GPU runs copied back without checkpoints).

    python benchmarks/rewrite_results.py FOLDER [--eval_samples N]

The recipe, model, dataset, batch and learning rate come from the records, the device and versions
from the folder's previous results.json. --eval_samples fills in the test-set size for records written
before runs stored it (state where the number comes from when you use it).
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
    opts = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
