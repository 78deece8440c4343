"""Train an ImageNet-1k classifier (any timm backbone) with ESAM, in the style of the transformers
example scripts. The data is `ILSVRC/imagenet-1k` (accept its terms on the Hub) or a local copy:

    accelerate launch --config_file examples/accelerate_ddp.yaml examples/train_imagenet.py \
        --output_dir runs/in1k-r50 --model_name resnet50 --num_train_epochs 90 \
        --per_device_train_batch_size 64 --learning_rate 0.1 --weight_decay 1e-4 --bf16 \
        --esam_rho 0.05 --esam_beta 0.6 --esam_gamma 0.5 [--dataset /data/imagenet-1k]

Transforms come from the backbone's timm data config (random resized crop + flip for training,
resize + centre crop for evaluation), the same config the saved image processor uses.
"""

from esam_hf.run import main

if __name__ == "__main__":
    main(defaults={"dataset": "imagenet", "model_name": "resnet50", "optim": "sgd",
                   "lr_scheduler_type": "cosine", "eval_strategy": "epoch", "save_strategy": "epoch",
                   "save_total_limit": 2, "dataloader_num_workers": 8, "per_device_eval_batch_size": 128})
