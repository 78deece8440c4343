"""Train a CIFAR-10/100 classifier with ESAM, in the style of the transformers example scripts.

    python examples/train_cifar.py --output_dir runs/c10-r18 --num_train_epochs 200 \
        --per_device_train_batch_size 128 --learning_rate 0.05 --weight_decay 1e-3 \
        --esam_rho 0.05 --esam_beta 0.6 --esam_gamma 0.5 [--dataset cifar100 --model_name cifar_wrn28_10]

Every ModelArguments, DataArguments (esam_hf/run.py) and ESAMTrainingArguments flag is accepted;
`esam-hf train --recipe NAME` fills them from the paper's table instead.
"""

from esam_hf.run import main

if __name__ == "__main__":
    main(defaults={"dataset": "cifar10", "model_name": "cifar_resnet18", "optim": "sgd",
                   "lr_scheduler_type": "cosine", "eval_strategy": "epoch", "save_strategy": "epoch",
                   "save_total_limit": 2, "per_device_eval_batch_size": 256})
