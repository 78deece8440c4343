"""Train a CIFAR-10/100 classifier with ESAM, in the style of the transformers example scripts.

    python examples/train_cifar.py --output_dir runs/c10-r18                    # the cifar10-resnet18 recipe
    python examples/train_cifar.py --output_dir runs/c100-wrn --dataset cifar100 --model_name cifar_wrn28_10
    python examples/train_cifar.py --output_dir runs/x --num_train_epochs 30 --esam_selection random

Without --recipe, the paper's recipe for the named dataset and model (default cifar10-resnet18) fills
every option you do not set: SGD momentum 0.9, its learning rate, batch, weight decay, cosine schedule,
epochs and rho/beta/gamma. A model no recipe has gets the `generic` recipe (`esam-hf recipes`), its
learning rate scaled to your batch. Every ModelArguments, DataArguments (esam_hf/run.py) and
ESAMTrainingArguments flag is accepted and overrides it. A data mistake is one line (ESAM_HF_DEBUG=1:
the traceback).
"""

import os
import sys

from esam_hf.cli import choose_cpu_threads, run_command
from esam_hf.recipes import example_arguments
from esam_hf.run import main

PROG = os.path.basename(sys.argv[0])

if __name__ == "__main__":
    argv, recipe = example_arguments(sys.argv[1:], "cifar10-resnet18", PROG)
    if not {"-h", "--help"} & set(argv):
        choose_cpu_threads()
    run_command(lambda args: main(args, defaults={"dataset": "cifar10"}, prog=PROG, default_recipe=recipe), argv, PROG)
