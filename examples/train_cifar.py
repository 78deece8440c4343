"""Train a CIFAR-10/100 classifier with ESAM, in the style of the transformers example scripts.

    python examples/train_cifar.py --output_dir runs/c10-r18                    # the cifar10-resnet18 recipe
    python examples/train_cifar.py --output_dir runs/c100-wrn --dataset cifar100 --model_name cifar_wrn28_10
    python examples/train_cifar.py --output_dir runs/x --num_train_epochs 30 --esam_selection random

Without --recipe, the paper's recipe for the named dataset and model (default cifar10-resnet18) fills
every option you do not set: SGD momentum 0.9, its learning rate, batch, weight decay, cosine schedule,
epochs and rho/beta/gamma. Every ModelArguments, DataArguments (esam_hf/run.py) and
ESAMTrainingArguments flag is accepted and overrides it.
"""

import os
import sys

from esam_hf.run import main

if __name__ == "__main__":
    main(prog=os.path.basename(sys.argv[0]), default_recipe="cifar10-resnet18")
