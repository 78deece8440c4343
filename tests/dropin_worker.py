"""Models a user swaps `Trainer` for `ESAMTrainer` on, and the two-process half of tests/test_dropin.py.

Run by tests/test_dropin.py under `torchrun --nproc_per_node 2` (CPU, gloo): each case trains two steps
under ESAMTrainingArguments' defaults in the same process group (with gradient accumulation for "_ga2"); each rank saves, per case, the error
it raised (if any), the warnings ESAMTrainer logged and the final weights."""

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers
from torch import nn

# Per-example losses that are a mean ("mean", "items": the Trainer's `num_items_in_batch` normalisation), or not.
LOSSES = ("mean", "items", "extra", "double")


class KwNet(nn.Module):
    """A custom module whose `forward` takes `**kwargs`, so the Trainer passes it `num_items_in_batch` (and
    scales its loss by the number of processes). `loss`: "mean" (a plain cross-entropy mean, ignoring
    `num_items_in_batch`), "items" (summed, over `num_items_in_batch`), "extra" (the mean plus a penalty on
    the logits: an auxiliary term) or "double" (twice the mean). `declared`: the model names its head in a
    config, as transformers models do; without it ESAMTrainer guesses the head from the outputs.
    `returns`: "dict" or "tuple" ((loss, logits), what `return_dict=False` gives)."""

    def __init__(self, loss="mean", declared=False, returns="dict", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.loss, self.returns = loss, returns
        if declared:
            self.config = SimpleNamespace(problem_type="single_label_classification")

    def forward(self, pixel_values, labels=None, **kwargs):
        logits = self.head(self.body(pixel_values))
        loss = None
        if labels is not None:
            items = kwargs.get("num_items_in_batch")
            if self.loss == "items" and items is not None:
                loss = F.cross_entropy(logits, labels, reduction="sum") / items
            else:
                loss = F.cross_entropy(logits, labels)
            if self.loss == "extra":
                loss = loss + logits.pow(2).mean()
            elif self.loss == "double":
                loss = 2 * loss
        if self.returns == "tuple":
            return (logits,) if loss is None else (loss, logits)
        return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}


class NoKwNet(KwNet):
    """The same model with a `forward` that takes no `**kwargs`: the Trainer neither passes it
    `num_items_in_batch` nor rescales its loss."""

    def forward(self, pixel_values, labels=None):
        return super().forward(pixel_values, labels)


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=4))


def text_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, 10), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def run_case(build, data, args):
    """(error, warnings, weights) of a two-step ESAMTrainer run."""
    from transformers.testing_utils import CaptureLogger

    import esam_hf.trainer as trainer_module
    from helpers import SeqESAMTrainer, train

    model = build()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first_batch = []  # the rows of this rank's first forward pass
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: first_batch.append({k: v.clone() for k, v in kw.items() if k != "num_items_in_batch"})
        if not first_batch else None, with_kwargs=True)
    error = None
    with CaptureLogger(trainer_module.logger) as captured:
        try:
            train(SeqESAMTrainer, model, args, data)
        except ValueError as e:
            error = str(e)
    hook.remove()
    return {"error": error, "warnings": captured.out, "initial": initial, "first_batch": first_batch[0],
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


# The two-process cases: name -> (model builder, data, gradient accumulation steps).
DDP_CASES = {
    **{f"kw_{loss}": (lambda loss=loss: KwNet(loss, declared=True), "image", 1) for loss in LOSSES},
    "kw_mean_guessed": (lambda: KwNet("mean"), "image", 1),
    "kw_items_guessed": (lambda: KwNet("items"), "image", 1),
    "kw_extra_guessed": (lambda: KwNet("extra"), "image", 1),
    "nokw_mean_guessed": (lambda: NoKwNet("mean"), "image", 1),
    "nokw_extra": (lambda: NoKwNet("extra", declared=True), "image", 1),
    "bert": (tiny_bert, "text", 1),
    "kw_mean_guessed_ga2": (lambda: KwNet("mean"), "image", 2),
    "kw_items_guessed_ga2": (lambda: KwNet("items"), "image", 2),
    "kw_double_ga2": (lambda: KwNet("double", declared=True), "image", 2),
    "bert_ga2": (tiny_bert, "text", 2),
}


def main(out_dir):
    import torch.distributed as dist

    from helpers import make_args, make_data

    datasets = {"image": make_data(64), "text": text_data(64)}
    results = {}
    for name, (build, data, accumulation) in DDP_CASES.items():
        args = make_args(f"{out_dir}/run", per_device_train_batch_size=8, max_steps=2,
                         gradient_accumulation_steps=accumulation, logging_steps=10,
                         esam_selection="random")  # a descent on a subset: the loss must be checked
        results[name] = run_case(build, datasets[data], args)
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected two processes"
    torch.save(results, f"{out_dir}/rank{dist.get_rank()}.pt")
    # Shut the process group down before exit: left to interpreter teardown, gloo's threads can abort a rank.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
