"""The model, data and settings shared by tests/fsdp_worker.py (two sharded processes) and
tests/test_fsdp.py (the single-process reference)."""

import os
import sys

import torch
from torch import nn

ACCUMULATION = 2  # micro-batches per optimizer step
WORLD = 2
BATCH = 8  # per rank and micro-batch
MODES = {
    "sam": dict(rho=0.1, beta=1.0, gamma=1.0),
    "esam": dict(rho=0.1, beta=0.6, gamma=0.5, selection="sharpness"),
    "asam": dict(rho=0.5, beta=0.6, gamma=0.5, selection="sharpness", adaptive=True),
}


def esam_kwargs(mode: str) -> dict:
    return {**MODES[mode], "seed": 3}


def build_model() -> nn.Module:
    # Odd sizes: FSDP's dim-0 shards are uneven (5 rows on 2 ranks: 3 and 2; 3 rows: 2 and 1).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of one rank: different on every rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(ACCUMULATION)]


def enable_fsdp_on_cpu():
    """accelerate (1.16) turns FSDP on only for accelerator devices: on CPU it drops the Trainer's fsdp_config
    without a word and trains DDP. Switch FSDP on for the gloo CPU state as it would for GPUs, so the rest of the
    real path runs here: accelerate's fully_shard of the model, the Trainer's FSDP2 checkpointing and saving."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does on GPUs

    AcceleratorState.__init__ = patched


def trainer_case(output_dir: str, mode: str, fsdp: bool, world: int = WORLD, **extra):
    """(model, args, data) of an ESAMTrainer run on a tiny ViT: under FSDP2 on `world` ranks with `per_device`
    examples each (fsdp=True), or in one process on the same global batches (fsdp=False). SDS is off
    (gamma 1): it selects within each rank's batch, which one process cannot replay; SWP is on. `extra`
    overrides training arguments (benchmarks/gpu_check_fsdp.py runs the case on a GPU)."""
    from transformers import ViTConfig, ViTForImageClassification

    from helpers import make_args, make_data

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
                       patch_size=4, num_channels=3, num_labels=4)
    model = ViTForImageClassification(config)
    accumulation = 2 if "accum" in mode else 1
    per_device = 8 // accumulation
    overrides = dict(per_device_train_batch_size=per_device * (1 if fsdp else world), gradient_accumulation_steps=accumulation,
                     max_steps=4, optim="sgd", optim_args="momentum=0.9", learning_rate=0.1, esam_rho=0.05, esam_beta=0.6, esam_gamma=1.0,
                     bf16="bf16" in mode, save_strategy="steps" if "_resume" in mode else "no", save_steps=2)
    if fsdp:
        overrides.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"],
                                                         "cpu_ram_efficient_loading": "ram" in mode,
                                                         "state_dict_type": "SHARDED_STATE_DICT" if "sharded" in mode
                                                         else "FULL_STATE_DICT"})
    data = make_data(64)
    if "nan" in mode:  # one image of the second global batch: its gradient is NaN on every rank after the reduce
        data[20] = {**data[20], "pixel_values": torch.full_like(data[20]["pixel_values"], float("nan"))}
    return model, make_args(output_dir, **{**overrides, **extra}), data


def leave_process_group() -> None:
    """End a torchrun worker: every rank leaves the process group together, then the process exits without
    the interpreter's teardown. There gloo's worker threads can still hold tensors whose release needs the
    GIL, and a rank aborts ("terminate called without an active exception"): seen under load on CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
