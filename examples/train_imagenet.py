"""Train an ImageNet classifier (any timm backbone) with ESAM, in the style of the transformers examples.

    python examples/train_imagenet.py --output_dir runs/in1k-r50                   # the imagenet-resnet50 recipe
    python examples/train_imagenet.py --output_dir runs/in1k-r101 --model_name resnet101

Without --recipe, the recipe for the named model (default imagenet-resnet50: 90 epochs, SGD momentum
0.9, lr 0.1 per 256 images, weight decay 1e-4, cosine schedule) fills every option you do not set.
Every ModelArguments, DataArguments (esam_hf/run.py) and ESAMTrainingArguments flag overrides it.
"""

import os
import sys

from esam_hf.run import main

if __name__ == "__main__":
    main(defaults={"dataloader_num_workers": 8, "per_device_eval_batch_size": 128},
         prog=os.path.basename(sys.argv[0]), default_recipe="imagenet-resnet50")
