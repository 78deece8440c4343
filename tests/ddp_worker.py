"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo)."""

import sys

import torch
import torch.distributed as dist

from helpers import PlainNet, SeqESAMTrainer, TinyConvNet, make_args, make_data, train

out_dir, mode = sys.argv[1], sys.argv[2]
batchnorm = mode == "esam"
overrides = dict(per_device_train_batch_size=8, max_steps=3)
if mode == "rho0":
    overrides["esam_rho"] = 0.0
elif mode == "unused":  # a trainable tensor the forward never uses, always kept by SWP (beta 1)
    overrides.update(esam_beta=1.0, ddp_find_unused_parameters=True)
elif mode == "custom":  # a plain nn.Module returning {"logits", "loss"}, under ESAMTrainingArguments' defaults
    pass
else:
    overrides["esam_gamma_warmup"] = 0.5  # k changes from step to step: ranks must agree on it
model = PlainNet() if mode == "custom" else TinyConvNet(batchnorm=batchnorm)
if mode == "unused":
    model.unused = torch.nn.Parameter(torch.zeros(3))
sizes = []
model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
trainer = train(SeqESAMTrainer, model, make_args(f"{out_dir}/run", **overrides), make_data(64))
assert dist.is_initialized() and dist.get_world_size() == 2, "expected two processes"
rank = dist.get_rank()
torch.save({"world_size": dist.get_world_size(), "state": model.state_dict(),
            "kept": trainer.state.log_history[0].get("esam/swp_kept_fraction"), "sizes": sizes}, f"{out_dir}/rank{rank}.pt")
# Shut the process group down before exit: left to interpreter teardown, gloo's threads can abort a rank
# ("terminate called without an active exception") after its results are saved.
dist.barrier()
dist.destroy_process_group()
