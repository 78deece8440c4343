"""Train an ImageNet classifier (any timm backbone) with ESAM, in the style of the transformers examples.

    python examples/train_imagenet.py --output_dir runs/in1k-r50                   # the imagenet-resnet50 recipe
    python examples/train_imagenet.py --output_dir runs/in1k-r101 --model_name resnet101
    python examples/train_imagenet.py --output_dir runs/vit --model_name vit_small_patch16_224 --pretrained \
        --dataset my/dataset --per_device_train_batch_size 64                     # the generic recipe

Without --recipe, the recipe for the named model (default imagenet-resnet50: 90 epochs, SGD momentum
0.9, lr 0.1 per 256 images, weight decay 1e-4, cosine schedule) fills every option you do not set. A
model no recipe has gets the `generic` recipe (`esam-hf recipes`), its learning rate scaled to your
batch, never another model's recipe. Every ModelArguments, DataArguments (esam_hf/run.py) and
ESAMTrainingArguments flag overrides it. A data mistake is one line (ESAM_HF_DEBUG=1: the traceback).
"""

import os
import sys

from esam_hf.cli import choose_cpu_threads, run_command
from esam_hf.recipes import example_arguments
from esam_hf.run import main

PROG = os.path.basename(sys.argv[0])
# Workers decode and augment the JPEGs; more than the cores this process may use only compete for them.
WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

if __name__ == "__main__":
    argv, recipe = example_arguments(sys.argv[1:], "imagenet-resnet50", PROG)
    if not {"-h", "--help"} & set(argv):
        choose_cpu_threads()
    run_command(lambda args: main(args, defaults={"dataset": "imagenet", "dataloader_num_workers": WORKERS,
                                                  "per_device_eval_batch_size": 128},
                                  prog=PROG, default_recipe=recipe), argv, PROG)
