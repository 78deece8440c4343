"""`esam-hf`: train a recipe, benchmark throughput, reproduce SGD/SAM/ESAM, inspect flatness."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .recipes import OPTIMIZERS, RECIPES, get_recipe

COMMANDS = {
    "train": "train one recipe (any ESAMTrainingArguments / model / data flag overrides it)",
    "recipes": "list the recipes",
    "bench": "throughput of SGD, SAM and ESAM side by side",
    "reproduce": "train SGD, SAM and ESAM on one recipe over several seeds; tables and plots",
    "landscape": "loss landscape and top Hessian eigenvalue of saved models",
}


def recipe_defaults(name: str, optimizer: str) -> dict:
    """Argument defaults for `name` trained with `optimizer` (sgd | sam | esam)."""
    recipe = get_recipe(name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "model_name": recipe.model,
        "model_kwargs": json.dumps(recipe.model_kwargs) if recipe.model_kwargs else None,
        "dataset": recipe.dataset,
        "output_dir": os.path.join("outputs", f"{name}-{optimizer}"),
        "optim": "sgd",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "save_total_limit": 2,
        "logging_steps": 50,
        "report_to": "none",
        "per_device_eval_batch_size": 256,
        **recipe.training_args(optimizer, world_size),
    }


def train_main(argv: list[str]) -> dict:
    from .run import main as run_main

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=list(RECIPES))
    pre.add_argument("--optimizer", choices=OPTIMIZERS, default="esam")
    known, rest = pre.parse_known_args(argv)
    defaults = recipe_defaults(known.recipe, known.optimizer) if known.recipe else {}
    recipe = f"{known.recipe} ({known.optimizer})" if known.recipe else "custom"
    return run_main(rest, defaults, recipe=recipe,
                    prog="esam-hf train [--recipe NAME] [--optimizer sgd|sam|esam]")


def recipes_main(argv: list[str]) -> None:
    print("| recipe | dataset | model | epochs | batch | lr | wd | rho | beta | gamma |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in RECIPES.items():
        print(f"| {name} | {r.dataset} | {r.model} | {r.epochs} | {r.batch_size} | {r.learning_rate} | "
              f"{r.weight_decay} | {r.rho} | {r.beta} | {r.gamma} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
        print(f"usage: esam-hf COMMAND [options]\n\ncommands:\n{usage}\n\n`esam-hf COMMAND --help` for options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        train_main(rest)
    elif command == "recipes":
        recipes_main(rest)
    elif command == "bench":
        from .benchmark import main as bench_main

        bench_main(rest)
    elif command == "reproduce":
        from .reproduce import main as reproduce_main

        reproduce_main(rest)
    elif command == "landscape":
        from .reproduce import landscape_main

        landscape_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
