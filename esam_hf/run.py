"""Train an image classifier end to end: dataset + timm backbone + ESAMTrainer -> saved, carded model.

`esam-hf train` (`main`) and the examples are thin argument parsers around `train_image_classifier`.
Every run records what it trained in `esam_run.json` in its output folder: the settings that
determine the result, a checksum of the initial weights, the method, and its status (running,
finished or diverged). A rerun into that folder is refused unless it resumes the same settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from .arguments import argument_file_flags, explicit_options, make_parser, parse_args, usage_error
from .recipes import RECIPES, RecipeArguments, method_of, optimizer_conflicts, recipe_defaults

RUN_RECORD = "esam_run.json"
PROG = "esam-hf train"
# TrainingArguments that change what a run trains (compared before a run is reused or resumed);
# logging, saving, evaluation and data-loading options do not.
_RESULT_FIELDS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "warmup_ratio", "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "optim_args",
    "label_smoothing_factor", "bf16", "fp16", "tf32", "torch_compile",
)


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name: str = field(default="cifar_resnet18", metadata={"help": "Any timm model name, or cifar_resnet18, cifar_wrn28_10, cifar_pyramidnet110."})
    pretrained: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights (needs the Hub)."})
    model_kwargs: str | None = field(default=None, metadata={"help": 'JSON object of extra timm.create_model kwargs, e.g. \'{"drop_rate": 0.1}\'.'})
    channels_last: bool = field(default=False, metadata={"help": "Use the channels_last memory format (faster convolutions on GPUs)."})

    def __post_init__(self):
        self.timm_kwargs()  # a bad --model_kwargs fails here, before any work

    def timm_kwargs(self) -> dict[str, Any]:
        if not self.model_kwargs:
            return {}
        try:
            kwargs = json.loads(self.model_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_kwargs must be a JSON object such as '{{\"drop_rate\": 0.1}}': {e}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model_kwargs must be a JSON object such as '{{\"drop_rate\": 0.1}}', got {self.model_kwargs!r}")
        return kwargs


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset: str = field(default="cifar10", metadata={"help": "cifar10, cifar100, imagenet, cifar10-subset, a Hub id or a local directory."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (built in for the known datasets)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (built in for the known datasets)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a class-balanced subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a class-balanced subset of this size."})
    cutout: bool = field(default=True, metadata={"help": "CIFAR: Cutout 16px with p=0.5 (the paper's augmentation)."})
    random_crop: bool = field(default=True, metadata={"help": "CIFAR: random crop 32 with 4px padding."})
    horizontal_flip: bool = field(default=True, metadata={"help": "CIFAR: random horizontal flip."})
    train_split: str | None = field(default=None, metadata={"help": "Training split (default: train)."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Evaluation split (default: test, else validation); 'none' turns evaluation off."})
    train_val_split: float = field(default=0.15, metadata={
        "help": "When the dataset has no evaluation split: the share of the training split held out (stratified, "
                "seeded by --seed) to evaluate on, as in the transformers examples; 0 = no evaluation."})
    check_images: bool = field(default=False, metadata={
        "help": "Decode every training image before the first step, so a bad one is an error naming its split "
                "and row, not a crash mid-epoch (CIFAR-size data is always decoded up front)."})
    check_eval_images: bool = field(default=True, metadata={
        "help": "Decode every evaluation image before training, so a bad one cannot fail the first evaluation."})


@dataclass
class RunArguments:
    _argument_group_name = "run"

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Delete output_dir first if it holds another run (otherwise a run into a non-empty output_dir is "
                "refused unless it resumes it with --resume_from_checkpoint last)."})


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (every device), as the Trainer does before it trains."""
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def build_model_and_data(model_args: ModelArguments, data_args: DataArguments, seed: int = 0, check_workers: int = 0):
    """Resolve the dataset, build the model for its classes (weights from `seed`, whatever ran before),
    and the data pipeline that matches the model's input config (so training transforms and the saved
    image processor agree). `check_workers` processes decode the images that `data_args` asks to check."""
    from .data import build_datasets, cifar_data_config, load_splits, resolve_dataset
    from .models import create_model

    spec = resolve_dataset(data_args.dataset, data_args.image_column, data_args.label_column,
                           train_split=data_args.train_split, eval_split=data_args.eval_split,
                           train_val_split=data_args.train_val_split)
    # The model needs the class names and the pipeline needs the model's data config; this first,
    # validating read is answered from the datasets cache when build_datasets loads the splits again.
    class_names = load_splits(spec, max_train_samples=1, max_eval_samples=1, seed=seed)[2]
    kwargs = model_args.timm_kwargs()
    if spec.kind == "cifar":  # normalisation statistics of this CIFAR, stored in the saved config
        stats = cifar_data_config(len(class_names))
        kwargs.setdefault("pretrained_cfg_overlay", {"mean": tuple(stats["mean"]), "std": tuple(stats["std"])})
    set_seed(seed)
    model = create_model(model_args.model_name, class_names, pretrained=model_args.pretrained, **kwargs)
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = build_datasets(
        spec, dict(model.config.pretrained_cfg), max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples, seed=seed, crop=data_args.random_crop,
        flip=data_args.horizontal_flip, cutout=data_args.cutout, check_train_images=data_args.check_images,
        check_eval_images=data_args.check_eval_images, check_workers=check_workers,
    )
    return spec, model, data


def paper_sgd_options(args) -> dict[str, Any]:
    """The authors' SGD: momentum 0.9 (or `--optim_args momentum=X`), weight decay on every parameter."""
    options = dict(kv.split("=") for kv in (args.optim_args or "").replace(" ", "").split(",") if kv)
    return {"lr": args.learning_rate, "weight_decay": args.weight_decay, "momentum": float(options.get("momentum", 0.9)),
            "nesterov": options.get("nesterov", "") in ("true", "True", "1")}


def paper_sgd(model: torch.nn.Module, args) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), **paper_sgd_options(args))


class PaperSGD(torch.optim.SGD):
    """`paper_sgd` for a Trainer that builds the optimizer itself (under FSDP, which refuses a ready one, since
    the parameters are replaced by their shards): the Trainer's groups exempt biases and norms from weight
    decay, the authors decay every parameter."""

    def __init__(self, params, weight_decay: float = 0.0, **kwargs):
        super().__init__([{**g, "weight_decay": weight_decay} for g in params], weight_decay=weight_decay, **kwargs)


def make_trainer(model_args: ModelArguments, data_args: DataArguments, training_args, trainer_cls=None, **trainer_kwargs):
    """An ESAMTrainer (or `trainer_cls`) wired to the model, data and top-1/top-5 metrics."""
    _, model, data = build_model_and_data(model_args, data_args, training_args.seed,
                                          check_workers=training_args.dataloader_num_workers)
    return image_trainer(model, data, training_args, trainer_cls, **trainer_kwargs)


def image_trainer(model, data, training_args, trainer_cls=None, **trainer_kwargs):
    """The trainer of `make_trainer` for a model and data already built.
    `optim="sgd"` means the paper's SGD (`paper_sgd`), not the Trainer's momentum-free default."""
    from .metrics import compute_metrics_fn
    from .trainer import ESAMTrainer

    training_args.remove_unused_columns = False  # datasets already yield model inputs; nothing to prune
    top_k = (1, 5) if len(data.class_names) >= 10 else (1,)
    if training_args.optim == "sgd" and _fsdp(training_args):
        trainer_kwargs.setdefault("optimizer_cls_and_kwargs", (PaperSGD, paper_sgd_options(training_args)))
    elif training_args.optim == "sgd":
        trainer_kwargs.setdefault("optimizers", (paper_sgd(model, training_args), None))
    return (trainer_cls or ESAMTrainer)(
        model=model, args=training_args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
        data_collator=data.collator, compute_metrics=compute_metrics_fn(top_k), **trainer_kwargs,
    )


def _fsdp(training_args) -> bool:
    """Whether the Trainer will shard with FSDP: asked in TrainingArguments or by `accelerate launch`'s config."""
    return bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


# --------------------------------------------------------------------------- #
# Training time without evaluation: a per-epoch timeline
# --------------------------------------------------------------------------- #
TIMELINE = "timeline.json"
_EVAL_KEYS = ("eval_accuracy", "eval_top5_accuracy", "eval_loss")


def _clock() -> float:
    if torch.cuda.is_available():  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()
    return time.perf_counter()


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


class TimelineCallback(TrainerCallback):
    """Writes `timeline.json`: per epoch the step, cumulative training seconds, mean train loss and
    eval metrics. The clock runs from each epoch's start to its end, so evaluation and checkpoints
    are not counted. On resume, entries after the checkpoint's step are dropped (that work is redone)
    and the clock continues from the last entry kept."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, train_dataloader=None, eval_dataloader=None, **kwargs):
        saved = read_json(self.path, {}).get("epochs", [])
        self.epochs = [e for e in saved if e["step"] <= state.global_step]  # state is the checkpoint's by now
        self.seconds = self.epochs[-1]["train_seconds"] if self.epochs else 0.0
        self.train_samples = len(train_dataloader.dataset) if train_dataloader is not None else None
        self.last_logged = state.global_step

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.loss_sum, self.loss_steps = 0.0, 0
        self.start = _clock()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds += _clock() - self.start
        self.epochs.append({"epoch": round(state.epoch, 4), "step": state.global_step, "train_seconds": self.seconds})
        control.should_log = True  # a loss log at every epoch end, so no log spans two epochs
        self._fill_loss(args, state)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # the mean loss of the steps since the previous log
            steps = state.global_step - self.last_logged
            self.loss_sum, self.loss_steps = self.loss_sum + logs["loss"] * steps, self.loss_steps + steps
            self.last_logged = state.global_step
            self._fill_loss(args, state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        entry = self.epochs[-1] if self.epochs else None
        if entry and entry["step"] == state.global_step and "eval_accuracy" not in entry:
            entry.update({k: v for k, v in (metrics or {}).items() if k in _EVAL_KEYS})
            self._write(state)

    def _fill_loss(self, args, state):
        # The epoch's loss is complete once every step up to its end has been logged.
        entry = self.epochs[-1] if self.epochs else None
        if entry and entry["step"] == self.last_logged == state.global_step and self.loss_steps:
            entry["train_loss"] = self.loss_sum / self.loss_steps
        self._write(state)

    def _write(self, state):
        if state.is_world_process_zero:
            write_json(self.path, {"train_samples": self.train_samples,
                                   "epochs": self.epochs})


def training_throughput(output_dir: str, metrics: dict | None = None) -> tuple[float | None, float | None]:
    """(training seconds, images/s) of a run, evaluation and checkpoints excluded, from its timeline;
    without one, the Trainer's own numbers (which include them)."""
    timeline = read_json(os.path.join(output_dir, TIMELINE), {"epochs": []})
    epochs = timeline["epochs"]
    if epochs and timeline.get("train_samples") and epochs[-1]["train_seconds"] > 0:
        seconds = epochs[-1]["train_seconds"]
        return seconds, timeline["train_samples"] * epochs[-1]["epoch"] / seconds
    metrics = metrics or {}
    return metrics.get("train_runtime"), metrics.get("train_samples_per_second")


# --------------------------------------------------------------------------- #
# What a run trained: its record
# --------------------------------------------------------------------------- #
def run_settings(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict[str, Any]:
    """The settings that determine a run's result, JSON-ready."""
    from .trainer import esam_config

    training = {name: getattr(training_args, name) for name in _RESULT_FIELDS if hasattr(training_args, name)}
    training.update(esam_config(training_args))
    settings = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                "training": training, "world_size": training_args.world_size}
    return json.loads(json.dumps(settings, default=str))


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 of the model's state (parameters and buffers), to show runs start from the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_record(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the run record is damaged; delete {output_dir} "
                         "(or pass --overwrite_output_dir) to train it again.") from None


def write_json(path: str, content: Any) -> None:
    """Write JSON atomically: a kill mid-write leaves the previous file, never a truncated one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2, default=str)
    os.replace(tmp, path)


def settings_differences(recorded: dict, settings: dict) -> list[str]:
    """`section.name: recorded -> now` for every setting that differs."""
    diffs = []
    for section in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(section), settings.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        elif old != new:
            diffs.append(f"{section}: {old!r} -> {new!r}")
    return diffs


# What --overwrite_output_dir may delete: the files a run writes (ours and the Trainer's). Anything
# else in the folder is the user's, and the overwrite is refused rather than deleting it.
RUN_FILES = frozenset({
    RUN_RECORD, "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json",
    "training_args.bin", "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "preprocessor_config.json", "README.md", "runs", "timeline.json",
})
RUN_PATTERNS = ("checkpoint-*", "tmp-checkpoint-*", "model-*-of-*.safetensors", f"{RUN_RECORD}.tmp-*",
                "*_results.json.tmp-*")
# The model code a CIFAR model saves with itself (esam_hf/models' remote-code module and what it imports);
# any other .py file in the folder is the user's.
RUN_FILES |= {"modeling_esam_cifar.py", "_cifar.py", "cifar_resnet.py", "cifar_wrn.py", "cifar_pyramidnet.py"}
LOCK_NAME = ".esam_run.lock"
# What a checkpoint needs to resume exactly: without the optimizer and scheduler the learning-rate
# schedule restarts at its peak with fresh momentum; without the ESAM state the SWP draws repeat.
CHECKPOINT_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "esam_state.pt")
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "adapter_model.safetensors", "adapter_model.bin")


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or any(fnmatch.fnmatch(name, pattern) for pattern in RUN_PATTERNS)


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders of `output_dir`, newest (highest step) first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        step = name.removeprefix("checkpoint-")
        if name.startswith("checkpoint-") and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(step), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_problem(checkpoint: str) -> str | None:
    """Why `checkpoint` cannot resume a run exactly (a missing, empty, truncated or unparsable file), or None."""
    if not os.path.isdir(checkpoint):
        return "it is not a folder"
    names = set(os.listdir(checkpoint))
    missing = [n for n in CHECKPOINT_STATE if n not in names]
    if not names & set(CHECKPOINT_WEIGHTS):
        missing.insert(0, "the model weights (model.safetensors)")
    if missing:
        return f"it lacks {', '.join(missing)}"
    for name in sorted(names):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            continue
        if os.path.getsize(path) == 0:
            return f"{name} is empty"
        if name.endswith(".json"):
            try:
                with open(path) as f:
                    json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return f"{name} is not valid JSON ({e})"
        elif name.endswith((".pt", ".pth", ".bin")):
            # torch.save writes a zip whose directory is at the end: a file cut short has none.
            if not zipfile.is_zipfile(path):
                return f"{name} is truncated or not a torch file"
    return None


def resolve_checkpoint(output_dir: str, requested: str | bool | None) -> str | None:
    """The checkpoint to resume: `requested` as given (checked), or for True the newest complete one in
    `output_dir`, saying which newer ones were skipped and why. Raises ValueError naming every problem."""
    if not requested:
        return None
    if requested is not True:
        problem = checkpoint_problem(requested)
        if problem:
            raise ValueError(f"--resume_from_checkpoint {requested}: {problem}, so the run cannot continue exactly "
                             "where it stopped. Resume from another checkpoint, or start over.")
        return requested
    skipped = []
    for checkpoint in checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for path, why in skipped:
                print(f"{PROG}: skipping {path}: {why} (a run killed while saving, or saved with --save_only_model); "
                      f"resuming from {checkpoint}. Delete the damaged folder to silence this.", file=sys.stderr)
            return checkpoint
        skipped.append((checkpoint, problem))
    if skipped:
        raise ValueError(f"--resume_from_checkpoint last: no checkpoint in {output_dir} can resume the run exactly ("
                         + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
                         + "). Start over with --overwrite_output_dir.")
    raise ValueError(f"--resume_from_checkpoint last: {output_dir} holds no checkpoint to resume (the run stopped before "
                     "its first save). Start over with --overwrite_output_dir.")


class OutputDirClaim:
    """This process's hold on an output folder: a lock file created exclusively (so a second run into the
    same folder is refused, not raced), and the old run's files that `--overwrite_output_dir` replaces,
    deleted only by `clear_old_run()` once the new run's data and model are built."""

    def __init__(self, output_dir: str, old_files: list[str]):
        self.output_dir, self.old_files = output_dir, old_files
        self.lock = os.path.join(output_dir, LOCK_NAME)

    def clear_old_run(self) -> None:
        for path in self.old_files:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        self.old_files = []

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock)


def _take_lock(output_dir: str) -> None:
    lock = os.path.join(output_dir, LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    host, pid = f.read().split()
            except (OSError, ValueError):  # being written this instant, or damaged
                host, pid = None, "0"
            if host == socket.gethostname() and not _alive(int(pid)):
                os.unlink(lock)  # left by a run that was killed: take it over
                continue
            raise ValueError(f"--output_dir {output_dir} is in use by another run (process {pid} on {host}; lock file "
                             f"{lock}). Wait for it, or choose another --output_dir. If no such run exists, delete the "
                             "lock file.") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return
    raise ValueError(f"--output_dir {output_dir}: could not take the lock file {lock}; another run is starting there.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def claim_output_dir(output_dir: str, settings: dict, *, resume: str | bool | None, overwrite: bool,
                     protected: list[str] = ()) -> OutputDirClaim:
    """Check that a run may write into `output_dir`, then lock it. A folder is reused only to resume an
    unfinished run with the same settings, or with `overwrite` to replace a run of ours: files that are
    not a run's, the working directory and a folder holding `protected` paths (the dataset) are never
    deleted. Raises ValueError saying what is in the way, before anything is built or deleted."""
    existing = sorted(n for n in os.listdir(output_dir) if n != LOCK_NAME) if os.path.isdir(output_dir) else []
    old_files: list[str] = []
    if existing:
        record = read_record(output_dir)
        if overwrite:
            here = os.path.realpath(output_dir)
            inside = [p for p in [os.getcwd(), *protected] if p and os.path.realpath(p).startswith(here + os.sep) or
                      p and os.path.realpath(p) == here]
            if inside:
                raise ValueError(f"--overwrite_output_dir: {output_dir} holds {inside[0]} (the working directory or "
                                 "the dataset); choose another --output_dir.")
            foreign = [n for n in existing if not _is_run_file(n)]
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise ValueError(f"--overwrite_output_dir only replaces a training run, and {output_dir} also holds "
                                 f"{shown}. Move those away, or choose another --output_dir.")
            old_files = [os.path.join(output_dir, n) for n in existing]
        elif resume:
            if record is None:
                raise ValueError(f"--resume_from_checkpoint: {output_dir} has no {RUN_RECORD}, so what trained it is "
                                 "unknown; pass --overwrite_output_dir to start over, or choose another --output_dir.")
            diffs = settings_differences(record["settings"], settings)
            if diffs:
                raise ValueError(f"--resume_from_checkpoint: {output_dir} was trained with other settings ("
                                 + "; ".join(diffs[:8]) + "). Resume with the same options, or pass "
                                 "--overwrite_output_dir to start over, or choose another --output_dir.")
            if record.get("status") == "finished":
                raise ValueError(f"--resume_from_checkpoint: the run in {output_dir} has finished; there is nothing to "
                                 "resume and its results stand. Train it again with --overwrite_output_dir, or choose "
                                 "another --output_dir.")
            if resume is True:
                resolve_checkpoint(output_dir, True)  # refuse now if nothing can be resumed
        else:
            raise ValueError(_occupied_message(output_dir, record))
    os.makedirs(output_dir, exist_ok=True)
    _take_lock(output_dir)
    return OutputDirClaim(output_dir, old_files)


def _occupied_message(output_dir: str, record: dict | None) -> str:
    if record is None:
        return (f"--output_dir {output_dir} already holds other files. Choose another --output_dir (or, if it holds "
                "only an old run, replace it with --overwrite_output_dir).")
    what = f"{record.get('method', '')} run".strip()
    status = record.get("status")
    if status == "finished":
        top1 = (record.get("metrics") or {}).get("eval_accuracy")
        score = f" (top-1 {top1:.4f})" if isinstance(top1, float) else ""
        return (f"--output_dir {output_dir} already holds a finished {what}{score}. Replace it with "
                "--overwrite_output_dir, or choose another --output_dir.")
    if status in ("running", "failed", "interrupted") and not checkpoints(output_dir):
        return (f"--output_dir {output_dir} holds a {what} that stopped before its first checkpoint ({status}). "
                "Start over with --overwrite_output_dir, or choose another --output_dir.")
    return (f"--output_dir {output_dir} already holds a {status} {what}. Continue it with --resume_from_checkpoint "
            "last, replace it with --overwrite_output_dir, or choose another --output_dir.")


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def train_image_classifier(model_args: ModelArguments, data_args: DataArguments, training_args,
                           recipe: str = "custom", resume_from_checkpoint: str | bool | None = None,
                           callbacks: list | None = None, train: bool = True, evaluate: bool = True,
                           claim: OutputDirClaim | None = None) -> dict[str, Any]:
    """Train (`train`), save the model (with its image processor config and card), evaluate
    (`evaluate`); record the run in `esam_run.json`. Returns the final metrics. (`esam-hf train`
    passes `--do_train` / `--do_eval` here, both on unless one of them is given.)

    A run that diverged (non-finite gradients or weights) records "diverged", writes its results
    with the reason and raises `TrainingDiverged`: it never reports a score as if it had trained.
    A run stopped by any other error records "failed" (or "interrupted") with the error. With `claim`
    (from `claim_output_dir`), the old run it replaces is deleted only once the new data and model are
    built, so a mistake in the new command costs nothing."""
    from .trainer import TrainingDiverged, esam_config

    output_dir = training_args.output_dir
    settings = run_settings(model_args, data_args, training_args)
    spec, model, data = build_model_and_data(model_args, data_args, training_args.seed,
                                             check_workers=training_args.dataloader_num_workers)
    trainer = image_trainer(model, data, training_args, callbacks=callbacks)
    if claim is not None:
        claim.clear_old_run()
    record = read_record(output_dir) or {}
    record.pop("metrics", None)
    record.update(settings=settings, method=method_of(esam_config(training_args)), recipe=recipe, status="running",
                  train_samples=len(data.train_dataset) if data.train_dataset is not None else None,
                  eval_samples=len(data.eval_dataset) if data.eval_dataset is not None else None)
    record.setdefault("initial_weights_sha256", weights_checksum(trainer.model))

    if resume_from_checkpoint:
        record["resumed_from"] = resume_source(resume_from_checkpoint, output_dir)
    if trainer.is_world_process_zero():
        os.makedirs(output_dir, exist_ok=True)
        write_json(os.path.join(output_dir, RUN_RECORD), record)

    metrics: dict[str, Any] = {}
    if train:
        try:
            metrics.update(trainer.train(resume_from_checkpoint=resume_from_checkpoint).metrics)
        except TrainingDiverged as e:
            _finish(trainer, record, {**metrics, "diverged": str(e)}, status="diverged")
            raise
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            if trainer.is_world_process_zero():
                write_json(os.path.join(output_dir, RUN_RECORD),
                           {**record, "status": status, "error": f"{type(e).__name__}: {e}"})
            raise
        # Save before evaluating: an evaluation error must not cost the finished training.
        trainer.save_model()
        trainer.save_state()
    if evaluate and trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    broken = [k for k in ("train_loss", "eval_loss") if k in metrics and not math.isfinite(metrics[k])]
    if broken:  # finite weights whose outputs overflow: no score of this model means anything
        reason = (f"{' and '.join(broken)} not finite: the weights grew until the model's outputs overflow "
                  "(lower the learning rate or weight decay)")
        kept = {k: v for k, v in metrics.items() if not k.endswith("accuracy")}  # scores of a broken model: dropped
        _finish(trainer, record, {**kept, "diverged": reason}, status="diverged")
        raise TrainingDiverged(f"training diverged: {reason}")
    _finish(trainer, record, metrics, status="finished")
    if train:
        kwargs = card_kwargs(spec, data, model, model_args, data_args, recipe, output_dir, record)
        trainer.create_model_card(**kwargs)
        if training_args.push_to_hub:
            trainer.push_to_hub(**kwargs)
    return metrics


def restore_card(model_args: ModelArguments, data_args: DataArguments, training_args, recipe: str = "custom") -> str:
    """Write a finished run's model card again from what the run saved (the model, `trainer_state.json`
    with its logged metrics, the record), e.g. after the README.md was lost. Returns the card's path."""
    from transformers import AutoModelForImageClassification, TrainerState

    from . import models  # noqa: F401  (the CIFAR backbones, for from_pretrained)

    out = training_args.output_dir
    spec, _, data = build_model_and_data(model_args, data_args, training_args.seed)
    model = AutoModelForImageClassification.from_pretrained(out)
    trainer = image_trainer(model, data, training_args)
    trainer.state = TrainerState.load_from_json(os.path.join(out, "trainer_state.json"))
    record = read_record(out) or {}
    # The final evaluation ran after trainer_state.json was saved: the record holds it.
    final = {k: v for k, v in (record.get("metrics") or {}).items() if k.startswith("eval_")}
    if final:
        trainer.state.log_history.append(final)
    trainer.create_model_card(**card_kwargs(spec, data, model, model_args, data_args, recipe, out, record))
    return os.path.join(out, "README.md")


def resume_source(checkpoint: str | bool, output_dir: str) -> dict[str, Any]:
    """Where a resumed run continues from: the checkpoint, its step, and the method of the run that wrote it."""
    path = checkpoint if isinstance(checkpoint, str) else (checkpoints(output_dir) or [None])[0]
    source: dict[str, Any] = {"checkpoint": os.path.abspath(path) if path else None}
    if path:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(os.path.join(path, "trainer_state.json")) as f:
                source["step"] = json.load(f)["global_step"]
        with contextlib.suppress(ValueError, OSError):
            parent = read_record(os.path.dirname(os.path.abspath(path)))
            if parent:
                source["method"] = parent.get("method")
    return source


def card_kwargs(spec, data, model, model_args: ModelArguments, data_args: DataArguments, recipe: str,
                output_dir: str, record: dict | None = None) -> dict[str, Any]:
    """What the model card says about the run: the dataset's Hub id (or path) and the name it was asked
    by, the evaluated split and how much of it, the recipe, the pretrained weights it started from, and
    the checkpoint it was resumed from (from the run's record)."""
    finetuned_from = None
    if model_args.pretrained:
        cfg = getattr(getattr(model, "timm_model", model), "pretrained_cfg", None) or {}
        finetuned_from = cfg.get("hf_hub_id") or model_args.model_name
    return {"dataset": spec.path, "dataset_name": data_args.dataset, "eval_split": spec.eval_name,
            "eval_samples": len(data.eval_dataset) if data.eval_dataset is not None else None,
            "eval_split_size": data.eval_split_size, "recipe": recipe, "finetuned_from": finetuned_from,
            "model_name": os.path.basename(os.path.normpath(output_dir)),
            **({"resumed_from": record["resumed_from"]} if (record or {}).get("resumed_from") else {})}


def _finish(trainer, record: dict, metrics: dict, status: str) -> None:
    if trainer.is_world_process_zero():
        # The transformers examples' files: train_results.json and eval_results.json beside all_results.json.
        out = trainer.args.output_dir
        for split, part in (("train", {k: v for k, v in metrics.items() if not k.startswith("eval_")}),
                            ("eval", {k: v for k, v in metrics.items() if k.startswith("eval_") or k == "epoch"})):
            if any(k != "epoch" for k in part):
                write_json(os.path.join(out, f"{split}_results.json"), part)
        write_json(os.path.join(out, "all_results.json"), metrics)
        write_json(os.path.join(trainer.args.output_dir, RUN_RECORD), {**record, "status": status, "metrics": metrics})


# --------------------------------------------------------------------------- #
# `esam-hf train`
# --------------------------------------------------------------------------- #
TRAIN_DEFAULTS = {"remove_unused_columns": False, "report_to": "none"}


def _option(argv: list[str], name: str) -> str | None:
    """The value of `--name X` or `--name=X` in argv (the last one), or None."""
    value = None
    for i, token in enumerate(argv):
        if token == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


def default_recipe_for(argv: list[str], fallback: str) -> str:
    """The recipe whose dataset and model the command line names (`--dataset cifar100 --model_name
    cifar_wrn28_10` -> cifar100-wrn28-10), else `fallback`'s with the named dataset, else `fallback`."""
    dataset, model = _option(argv, "dataset"), _option(argv, "model_name")
    base = RECIPES[fallback]
    for name, r in RECIPES.items():
        if r.dataset == (dataset or base.dataset) and r.model == (model or base.model):
            return name
    return fallback


def parse(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str = PROG,
          default_recipe: str | None = None):
    """`(recipe_args, run_args, model_args, data_args, training_args)` from the command line: a recipe's
    defaults (and `defaults`) under the flags given; an `--optimizer` that contradicts a flag is refused.
    Without `--recipe`, `default_recipe` (if given; see `default_recipe_for`) supplies the defaults, and
    the command says so: an example script must not train at the Trainer's learning rate by accident."""
    from .trainer import ESAMTrainingArguments

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = make_parser([RecipeArguments], prog=prog, add_help=False)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # one argument file
        argv = argument_file_flags(pre, argv[0])
    recipe = pre.parse_known_args(argv)[0]  # the recipe decides the other options' defaults
    if recipe.recipe is None and default_recipe is not None:
        recipe.recipe = default_recipe_for(argv, default_recipe)
        argv = ["--recipe", recipe.recipe, *argv]
        print(f"{prog}: no --recipe given: using the {recipe.recipe!r} recipe's settings for every option you did "
              "not set (`esam-hf recipes` lists them).", file=sys.stderr)
    defaults = {**TRAIN_DEFAULTS, "dataloader_pin_memory": torch.cuda.is_available(), **(defaults or {}),
                **recipe_defaults(recipe.recipe, recipe.optimizer)}
    recipes = "; ".join(f"{name} ({r.model} on {r.dataset}, {r.epochs} epochs)" for name, r in RECIPES.items())
    parser = make_parser(
        [RecipeArguments, RunArguments, ModelArguments, DataArguments, ESAMTrainingArguments], prog=prog,
        defaults=defaults, first_group=("ESAM (sharpness-aware minimization)", "esam_"),
        description="Train an image classifier with ESAM, SAM or SGD. Recipes: " + recipes + ".",
        epilog="Every transformers TrainingArguments option is accepted. --resume_from_checkpoint last continues "
               "the newest checkpoint in --output_dir.")
    parsed = parse_args(parser, argv)
    recipe_args, training_args = parsed[0], parsed[-1]
    explicit = explicit_options(parser, argv)
    conflicts = optimizer_conflicts(recipe_args.optimizer, vars(training_args), explicit)
    if conflicts:
        parser.error(f"--optimizer {recipe_args.optimizer or 'esam'} contradicts {', '.join(conflicts)}: a run is "
                     "labelled by its optimizer, so drop one of them.")
    if not explicit & {"do_train", "do_eval", "do_predict"}:  # neither given: train and evaluate
        training_args.do_train = training_args.do_eval = True
    return parsed


def main(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str = PROG,
         default_recipe: str | None = None) -> dict[str, Any]:
    """Parse the options (over `defaults`, or `default_recipe`'s without `--recipe`), train, print the results."""
    recipe_args, run_args, model_args, data_args, training_args = parse(argv, defaults, prog, default_recipe)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        usage_error(prog,
            f"started as {launched} processes (accelerate launch / torchrun), but there is no GPU here, so each process "
            f"would train its own model into one folder. Add --use_cpu for real {launched}-process DDP on CPU "
            "(gloo), or launch a single process.")
    if training_args.push_to_hub:  # hours of training must not end in a failed upload
        problem = hub_problem()
        if problem:
            usage_error(prog, f"--push_to_hub: {problem}. Train without --push_to_hub and push the saved folder later.")
    # "last" (TrainingArguments' own option): the newest complete checkpoint in output_dir.
    resume = True if training_args.resume_from_checkpoint == "last" else training_args.resume_from_checkpoint
    claim = None
    if training_args.should_save:
        try:
            claim = claim_output_dir(training_args.output_dir, run_settings(model_args, data_args, training_args),
                                     resume=resume, overwrite=run_args.overwrite_output_dir,
                                     protected=[data_args.dataset, os.path.abspath(data_args.dataset)])
            resume = resolve_checkpoint(training_args.output_dir, resume)
        except ValueError as e:
            if claim is not None:
                claim.release()
            usage_error(prog, str(e))
    label = f"{recipe_args.recipe} ({recipe_args.optimizer or 'esam'})" if recipe_args.recipe else model_args.model_name
    from .trainer import TrainingDiverged

    try:
        metrics = train_image_classifier(model_args, data_args, training_args, recipe=recipe_args.recipe or "custom",
                                         resume_from_checkpoint=resume, train=training_args.do_train,
                                         evaluate=training_args.do_eval, claim=claim,
                                         callbacks=[TimelineCallback(os.path.join(training_args.output_dir, TIMELINE))])
    except TrainingDiverged as e:  # recorded as diverged in output_dir; no score to print
        print(f"{prog}: training diverged: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if claim is not None:
            claim.release()
    if training_args.should_save:
        seconds, images_per_s = training_throughput(training_args.output_dir, metrics)
        print(results_table({label: {**metrics, "train_seconds": seconds, "images_per_s": images_per_s}}))
        print(f"\nSaved to {training_args.output_dir}: model, preprocessing config and model card (README.md)")
    return metrics


def hub_problem() -> str | None:
    """Why a push to the Hub would fail (offline mode, no network, no token), or None."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1), so nothing can be uploaded"
    try:
        HfApi().whoami()
    except Exception as e:  # no token, a bad token, or no network: each its own exception type
        return f"the Hub cannot be reached with your credentials ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def results_table(runs: dict[str, dict]) -> str:
    """Markdown table of the metrics a user looks at first."""
    # Accuracies in percent, as the README's tables show them; training time and images/s without the
    # evaluations and checkpoints (from the run's timeline), as `reproduce` reports them.
    columns = [("eval_accuracy", "top-1 %"), ("eval_top5_accuracy", "top-5 %"), ("eval_loss", "eval loss"),
               ("train_loss", "train loss"), ("images_per_s", "images/s (training)"), ("train_seconds", "train s")]
    present = [(k, t) for k, t in columns if any(m.get(k) is not None for m in runs.values())]
    lines = ["| run | " + " | ".join(t for _, t in present) + " |", "|---" * (len(present) + 1) + "|"]

    def cell(key, value):
        if not isinstance(value, (int, float)):
            return str(value if value is not None else "")
        return f"{100 * value:.2f}" if key.endswith("accuracy") else f"{value:.4g}"

    for name, m in runs.items():
        cells = [cell(k, m.get(k)) for k, _ in present]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
