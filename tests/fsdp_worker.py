"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Mode "core": ESAM steps of the torch core (each of fsdp_case.MODES) on a float64 model sharded with FSDP2's
`fully_shard`; each rank saves the full gradients it ends with. Modes "trainer..." train a tiny ViT
with ESAMTrainer under the Trainer's FSDP2 (fsdp_config version 2); each rank saves its full weights.
Mode "cli": `esam-hf train --recipe demo` under FSDP2."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp_case import leave_process_group

out_dir, mode = sys.argv[1], sys.argv[2]


def core():
    from fsdp_case import MODES

    dist.init_process_group("gloo")
    return {name: core_mode(name) for name in MODES}


def core_mode(mode):
    from torch.distributed.fsdp import fully_shard

    from esam_hf.esam import ESAM
    from fsdp_case import ACCUMULATION, build_model, esam_kwargs, rank_batches

    model = build_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    esam = ESAM(model, **esam_kwargs(mode))

    def loss_fn(batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="none").detach()

    before = {name: p.full_tensor().clone() for name, p in model.named_parameters()}
    for x, y in rank_batches(dist.get_rank()):
        esam.step(loss_fn, (x, y), backward=lambda loss: (loss / ACCUMULATION).backward())
    return {
        "grads": {name: p.grad.full_tensor() for name, p in model.named_parameters()},
        "restored": all(torch.equal(p.full_tensor(), before[name]) for name, p in model.named_parameters()),
        "selection": esam.last_selection,
    }


def trainer():
    from fsdp_case import enable_fsdp_on_cpu, trainer_case
    from helpers import SeqESAMTrainer

    enable_fsdp_on_cpu()

    model, args, data = trainer_case(f"{out_dir}/run", mode, fsdp=True)
    resume = "_resume" in mode
    if resume:  # the first half, then a fresh trainer continues from its checkpoint
        args.max_steps = 2
        SeqESAMTrainer(model=model, args=args, train_dataset=data).train()
        model, args, data = trainer_case(f"{out_dir}/run", mode, fsdp=True)
    trainer = SeqESAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=f"{out_dir}/run/checkpoint-2" if resume else None)
    checkpoint = sorted(os.listdir(f"{out_dir}/run/checkpoint-2")) if resume else None
    trainer.save_model(f"{out_dir}/saved")
    state = {name: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone()
             for name, p in trainer.model.named_parameters()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"state": state, "sharded": type(next(trainer.model.parameters())).__name__,
            "skipped": trainer.nonfinite_guard.skipped, "checkpoint": checkpoint,
            "kept": [h.get("esam/swp_kept_fraction") for h in logs], "losses": [h["loss"] for h in logs]}


def cli():
    """`esam-hf train` (the paper's SGD, a CIFAR model saved with its code) under the Trainer's FSDP2."""
    from fsdp_case import enable_fsdp_on_cpu

    from esam_hf.run import main

    enable_fsdp_on_cpu()
    main(["--recipe", "demo", "--output_dir", f"{out_dir}/run", "--max_steps", "3", "--max_train_samples", "64",
          "--max_eval_samples", "32", "--use_cpu", "--fsdp", "full_shard", "--fsdp_config", '{"version": 2}'])
    return {}


result = trainer() if mode.startswith("trainer") else cli() if mode == "cli" else core()
result["world_size"] = dist.get_world_size()
torch.save(result, f"{out_dir}/rank{dist.get_rank()}.pt")
leave_process_group()
