"""Drop-in: scripts that train with `Trainer` train the same way with `ESAMTrainer`, and its warnings are true.

- The first-batch check (do the per-example losses reduce to the model's loss?) compares the model's own
  loss, not the loss the Trainer scaled: under 2-process DDP, where the Trainer multiplies the loss of a
  model taking loss kwargs by the number of processes, and under gradient accumulation, where
  `num_items_in_batch` spans several micro-batches.
- A model returning `(loss, logits)` trains as the one returning `{"loss", "logits"}`.
- The SDS stall warning does not fire on a healthy run; it does on a stalled one.
- `num_train_epochs=0` trains nothing, as `Trainer.train()` does.
- `torch_compile=True`: SDS subsets reuse the whole batch's graph, with the eager run's results.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.testing_utils import CaptureLogger

import esam_hf.trainer as trainer_module
from dropin_worker import DDP_CASES, KwNet, NoKwNet, run_case, tiny_vit
from helpers import SeqESAMTrainer, TinyConvNet, make_args, make_data, params_of, run_two_processes, train

FALSE_TERMS = "adds other terms"
GUESS_REFUSED = "cannot tell which loss"


def own_loss(case):
    """The loss KwNet("extra") returns on a batch, written out by hand: mean cross-entropy plus the mean
    squared logit, at the initial weights."""
    model = KwNet("extra")
    model.load_state_dict(case["initial"])
    batch = case["first_batch"]
    with torch.no_grad():
        logits = model.head(model.body(batch["pixel_values"]))
        return float(F.cross_entropy(logits, batch["labels"]) + logits.pow(2).mean())


# --------------------------------------------------------------------------- #
# The first-batch check sees the model's own loss
# --------------------------------------------------------------------------- #
def test_the_first_batch_check_sees_the_models_own_loss_under_two_process_ddp(tmp_path):
    r0, r1 = run_two_processes(tmp_path, "dropin", worker="dropin_worker.py")
    assert set(r0) == set(DDP_CASES)
    for name, case in r0.items():
        other = r1[name]
        model = name.removesuffix("_ga2")
        if model in ("kw_extra", "kw_double", "nokw_extra"):  # a declared head whose loss is not the mean: warns
            assert case["error"] is None and FALSE_TERMS in case["warnings"], (name, case["warnings"])
        elif model == "kw_extra_guessed":  # a guessed head whose loss is not the mean: refused
            assert GUESS_REFUSED in case["error"] and GUESS_REFUSED in other["error"], name
            # The loss the message reports is what the model returned on this rank's batch, not the
            # Trainer's loss scaled by the 2 processes.
            for rank in (case, other):
                assert f"returned loss {own_loss(rank):.6g})" in rank["error"], rank["error"]
            continue
        else:  # a mean of per-example losses, over the micro-batch or over num_items_in_batch: trains, silently
            assert case["error"] is None and other["error"] is None, (name, case["error"])
            assert case["warnings"] == "" and other["warnings"] == "", (name, case["warnings"])
        for key, value in case["state"].items():
            assert torch.equal(value, other["state"][key]), (name, key)  # one model on both ranks
        assert any(not torch.equal(v, case["initial"][k]) for k, v in case["state"].items()), name  # trained


def test_the_first_batch_check_sees_the_models_own_loss_under_gradient_accumulation(tmp_path, accumulation=2):
    data = make_data(64)

    def run(build):
        args = make_args(tmp_path, per_device_train_batch_size=8, max_steps=1, gradient_accumulation_steps=accumulation,
                         esam_selection="random")  # a descent on a subset: the loss must be checked
        return run_case(build, data, args)

    silent = {"vit": tiny_vit, "nokw_mean_guessed": lambda: NoKwNet("mean"), "kw_mean": lambda: KwNet("mean"),
              "kw_items_guessed": lambda: KwNet("items"), "kw_items": lambda: KwNet("items", declared=True)}
    for name, build in silent.items():
        case = run(build)
        assert case["error"] is None and case["warnings"] == "", (name, case["error"], case["warnings"])
    for loss in ("extra", "double"):
        assert FALSE_TERMS in run(lambda: KwNet(loss, declared=True))["warnings"], loss
    refused = run(lambda: KwNet("extra"))
    # Its losses' mean, their sum over the Trainer's count of the accumulated batch, and its own loss.
    batch = refused["first_batch"]
    model = KwNet("extra")
    model.load_state_dict(refused["initial"])
    with torch.no_grad():
        losses = F.cross_entropy(model.head(model.body(batch["pixel_values"])), batch["labels"], reduction="none")
    assert (f"losses is {float(losses.mean()):.6g}, or {float(losses.sum()) / (8 * accumulation):.6g} over the "
            f"Trainer's num_items_in_batch, but it returned loss {own_loss(refused):.6g})") in refused["error"]


# --------------------------------------------------------------------------- #
# Tuple outputs: (loss, logits)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("selection", ["random", "sharpness"])
def test_a_model_returning_a_loss_logits_tuple_trains_as_the_dict_returning_one(tmp_path, selection):
    data = make_data(64)
    args = make_args(tmp_path, max_steps=3, esam_selection=selection)
    as_tuple, as_dict = KwNet(returns="tuple"), KwNet(returns="dict")
    train(SeqESAMTrainer, as_tuple, args, data)
    train(SeqESAMTrainer, as_dict, args, data)
    initial = KwNet().state_dict()
    for key, value in as_dict.state_dict().items():
        assert torch.equal(as_tuple.state_dict()[key], value), key
        assert not torch.equal(value, initial[key]), key


def test_a_tuple_returning_model_is_checked_on_the_first_batch_as_a_dict_returning_one(tmp_path):
    model = KwNet("extra", returns="tuple")
    before = params_of(model)
    with pytest.raises(ValueError, match=GUESS_REFUSED + r" KwNet trains \(the mean of its per-example classification"):
        train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=1, esam_selection="random"), make_data(16))
    assert all(torch.equal(v, before[k]) for k, v in params_of(model).items())
    with CaptureLogger(trainer_module.logger) as captured:
        train(SeqESAMTrainer, KwNet("extra", declared=True, returns="tuple"),
              make_args(tmp_path, max_steps=1, esam_selection="random"), make_data(16))
    assert FALSE_TERMS in captured.out


# --------------------------------------------------------------------------- #
# The stall warning
# --------------------------------------------------------------------------- #
def imbalanced_data(n=64, seed=1, noise=3.0):
    """Half of the examples in class 0, the rest spread over 1-3; each class a noisy copy of its mean image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * (n // 2) + [1, 2, 3] * (n // 6) + [1, 2, 3][:n - n // 2 - 3 * (n // 6)])
    labels = labels[torch.randperm(n, generator=g)]
    means = torch.randn(4, 3, 8, 8, generator=g)
    images = means[labels] + noise * torch.randn(n, 3, 8, 8, generator=g)
    return [{"pixel_values": images[i], "labels": labels[i]} for i in range(n)]


def stall_run(tmp_path, lr):
    model = KwNet()
    torch.nn.init.zeros_(model.head.weight)  # uniform predictions: sharpness selection keeps the majority class
    torch.nn.init.zeros_(model.head.bias)
    steps = trainer_module.STALL_STEPS + 5
    args = make_args(tmp_path, max_steps=steps, logging_steps=5, esam_rho=0.05, esam_selection="sharpness")
    with CaptureLogger(trainer_module.logger) as captured:
        trainer = train(SeqESAMTrainer, model, args, imbalanced_data(),
                        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9))
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return logs, captured.out


def test_the_stall_warning_spares_a_healthy_run_and_catches_a_stalled_one(tmp_path):
    warning = "SDS is descending on one class at a time"
    logs, warned = stall_run(tmp_path, lr=0.01)
    first, last = logs[0], logs[-1]
    # The case the warning must not fire on: concentrated at the first logging step, then learning.
    assert first["esam/sds_top_class_share"] - first["esam/batch_top_class_share"] > trainer_module.CONCENTRATION_WARNING
    assert last["loss"] < 0.5 * first["loss"]
    assert warning not in warned
    # lr 0: the loss cannot fall, and selection stays on the majority class.
    logs, warned = stall_run(tmp_path, lr=0.0)
    assert logs[-1]["loss"] == pytest.approx(logs[0]["loss"])
    assert warning in warned and f"{trainer_module.STALL_STEPS} steps later" in warned


# --------------------------------------------------------------------------- #
# num_train_epochs=0
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("max_steps", [-1, 0])
def test_zero_epochs_train_nothing_as_the_trainer_does(tmp_path, max_steps):
    def run(trainer_cls, args_cls):
        model = TinyConvNet()
        args = args_cls(str(tmp_path), num_train_epochs=0, max_steps=max_steps, use_cpu=True, report_to="none",
                        save_strategy="no", per_device_train_batch_size=16)
        output = trainer_cls(model=model, args=args, train_dataset=make_data(32)).train()
        return output, params_of(model)

    output, weights = run(SeqESAMTrainer, trainer_module.ESAMTrainingArguments)
    reference, reference_weights = run(Trainer, TrainingArguments)
    assert (output.global_step, output.training_loss) == (reference.global_step, reference.training_loss) == (0, 0.0)
    assert output.metrics.keys() == reference.metrics.keys()
    assert all(torch.equal(v, reference_weights[k]) for k, v in weights.items())


def test_zero_epochs_stay_a_usage_error_on_the_command_line(tmp_path, capsys):
    from esam_hf.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--output_dir", str(tmp_path / "x"), "--num_train_epochs", "0"])
    assert exit_.value.code == 2
    assert "num_train_epochs must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- #
# torch_compile
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("selection, graphs", [("ascent", 1), ("random", 1), ("sharpness", 2)])  # + the no-grad selection pass
def test_compiled_sds_subsets_reuse_the_batch_graph_with_the_eager_results(tmp_path, selection, graphs):
    from torch._dynamo.utils import counters

    def run(**compile_args):
        # No BatchNorm (ESAM stops its running statistics at w + e: a recompile) nor convolution (torch's
        # CPU convolution branches on the batch size): what is left to recompile is ESAM's own doing.
        model = KwNet()
        train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=3, esam_selection=selection, **compile_args),
              make_data(48))
        return model

    eager = run()
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch_compile=True, torch_compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for the k-row subsets
    for (name, value), reference in zip(compiled.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(value, reference, rtol=0, atol=3e-8, msg=name)
    torch._dynamo.reset()
