"""Small models, data and a sequential-order Trainer shared by the tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import SequentialSampler
from transformers.modeling_outputs import ImageClassifierOutput

from esam_hf import ESAMTrainer, ESAMTrainingArguments

HERE = Path(__file__).resolve().parent


class TinyConvNet(nn.Module):
    """Conv + BatchNorm classifier with the Hugging Face calling convention."""

    def __init__(self, num_classes=4, batchnorm=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.GroupNorm(1, c))
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8, num_classes)
        self.config = SimpleNamespace(problem_type="single_label_classification")  # what Trainer reads of a config

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class PlainNet(nn.Module):
    """The commonest custom model: no config, no loss_type; forward(pixel_values, labels) -> {logits, loss}."""

    def __init__(self, loss="mean"):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.loss = loss

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        out = {"logits": logits}
        if labels is not None:
            if self.loss == "mean":
                out["loss"] = F.cross_entropy(logits, labels)
            else:  # a loss that is not a mean over examples: each example against the whole batch
                sim = logits @ logits.T
                out["loss"] = 0.5 * (F.cross_entropy(sim, torch.arange(len(sim))) + F.cross_entropy(sim.T, torch.arange(len(sim))))
        return out


def make_data(n=64, num_classes=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


def batches(data, batch_size):
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        yield torch.stack([d["pixel_values"] for d in chunk]), torch.stack([d["labels"] for d in chunk])


class SequentialMixin:
    """Visit the data in order so an independent reference can replay the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class SeqESAMTrainer(SequentialMixin, ESAMTrainer):
    pass


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=4, learning_rate=0.1,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", use_cpu=True, seed=0,
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return ESAMTrainingArguments(**kwargs)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)


def train(trainer_cls, model, args, data, make_optimizer=sgd, **kwargs):
    trainer = trainer_cls(model=model, args=args, train_dataset=data,
                          optimizers=(make_optimizer(model), None), **kwargs)
    trainer.train()
    return trainer


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Failures of the launcher's sockets, not of the code under test: worth one more try on a new port.
_INFRA_ERRORS = ("Address already in use", "Connection reset", "Connection refused", "timed out", "Broken pipe")


def run_two_processes(out_dir, mode, worker="ddp_worker.py", attempts=2):
    """Runs tests/`worker` OUT_DIR MODE in two torchrun processes (CPU, gloo); returns what each rank saved."""
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for attempt in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(HERE / worker), str(out_dir), mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        if proc.returncode == 0 or not any(e in output for e in _INFRA_ERRORS):
            break
        print(f"launcher failed on attempt {attempt + 1}, retrying:\n{output}")
    assert proc.returncode == 0, output
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
