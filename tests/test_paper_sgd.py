"""`--optim sgd` here is the authors' SGD, which transformers' own `--optim sgd` is not: why `PaperSGD` exists."""

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from esam_hf.run import PaperSGD, paper_sgd_options


def _groups(optimizer, model):
    """weight_decay and momentum of each parameter of `model`, by name."""
    by_id = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {name: (by_id[id(p)]["weight_decay"], by_id[id(p)]["momentum"]) for name, p in model.named_parameters()}


def test_the_trainers_sgd_exempts_biases_and_norms_from_weight_decay_and_paper_sgd_does_not(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", optim_args="momentum=0.9,weight_decay=0.05",
                             weight_decay=0.05, learning_rate=0.1, use_cpu=True, report_to="none")
    plain = _groups(Trainer(model=model, args=args).create_optimizer(), model)
    # Even asked through --optim_args, the Trainer's no-decay group keeps its own weight_decay of 0.
    assert plain == {"0.weight": (0.05, 0.9), "0.bias": (0.0, 0.9), "1.weight": (0.0, 0.9), "1.bias": (0.0, 0.9)}
    paper = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(PaperSGD, paper_sgd_options(args)))
    assert set(_groups(paper.create_optimizer(), model).values()) == {(0.05, 0.9)}  # every parameter decays


def test_paper_sgd_momentum_defaults_to_the_papers_where_transformers_has_none(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", weight_decay=5e-4, learning_rate=0.1,
                             use_cpu=True, report_to="none")
    assert Trainer.get_optimizer_cls_and_kwargs(args) == (torch.optim.SGD, {"lr": 0.1})  # torch's momentum 0
    assert paper_sgd_options(args) == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
