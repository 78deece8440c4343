"""The authors' SGD, which `--optim sgd` means in esam-hf: momentum 0.9 and weight decay on every parameter
(the Trainer's own `sgd` has no momentum and exempts biases and norm weights from weight decay)."""

from __future__ import annotations

from typing import Any

import torch


def paper_sgd_options(args) -> dict[str, Any]:
    """The authors' SGD: momentum 0.9 and `--weight_decay` unless `--optim_args` (momentum=X, nesterov=true,
    dampening=X, weight_decay=X, read as transformers reads them for `--optim sgd`) says otherwise."""
    from transformers import Trainer

    _, options = Trainer.get_optimizer_cls_and_kwargs(args)
    return {"momentum": 0.9, "weight_decay": args.weight_decay, **options}


def paper_sgd(model: torch.nn.Module, args) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), **paper_sgd_options(args))


# Not transformers' `--optim sgd` alone: `Trainer.create_optimizer` puts biases and norm weights in a group with
# weight_decay 0 that `--optim_args weight_decay=` cannot reach (a group's own value wins), and the authors decay
# every parameter.
class PaperSGD(torch.optim.SGD):
    """`paper_sgd` for a Trainer that builds the optimizer itself (under FSDP, which refuses a ready one, since
    the parameters are replaced by their shards): the Trainer's groups exempt biases and norms from weight
    decay, the authors decay every parameter."""

    def __init__(self, params, weight_decay: float = 0.0, **kwargs):
        super().__init__([{**g, "weight_decay": weight_decay} for g in params], weight_decay=weight_decay, **kwargs)
