"""ESAMTrainer against the plain Trainer and an independent hand-written SAM loop."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, Trainer, TrainingArguments

from esam_hf import ESAMTrainer, ESAMTrainingArguments

from transformers.modeling_outputs import ImageClassifierOutput

from helpers import (PlainNet, SeqESAMTrainer, SequentialMixin, TinyConvNet, adamw, batches, make_args, make_data,
                     params_of, sgd, train)


class SeqTrainer(SequentialMixin, Trainer):
    pass


def reference_sam(model, data, batch_size, steps, make_optimizer, rho, adaptive, max_grad_norm=0.0, accumulation=1):
    """Two-pass SAM written out by hand: e = rho g/||g|| (ASAM: rho w^2 g/|| |w| g ||), gradient at
    w + e, restore, base optimizer step. BatchNorm statistics are frozen at w + e by momentum 0."""
    optimizer = make_optimizer(model)
    params = list(model.parameters())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    it = batches(data, batch_size)
    for _ in range(steps):
        for _ in range(accumulation):
            x, y = next(it)
            loss = F.cross_entropy(model(x).logits, y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                if adaptive:
                    norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads)))
                    e = [rho * p * p * g / (norm + 1e-12) for p, g in zip(params, grads)]
                else:
                    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
                    e = [rho * g / (norm + 1e-12) for g in grads]
                saved = [p.clone() for p in params]
                for p, d in zip(params, e):
                    p.add_(d)
            for m in bns:
                m.momentum = 0.0
            (F.cross_entropy(model(x).logits, y) / accumulation).backward()
            for m in bns:
                m.momentum = 0.1
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return model


def assert_same_params(a, b, atol=1e-5, rtol=1e-4):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if "num_batches_tracked" in k:
            continue
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=rtol, msg=k)


@pytest.mark.parametrize("make_optimizer", [sgd, adamw], ids=["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_matches_hand_written_reference(tmp_path, make_optimizer, adaptive):
    data = make_data(64)
    rho = 0.5 if adaptive else 0.05
    args = make_args(tmp_path, esam_rho=rho, esam_beta=1.0, esam_gamma=1.0, esam_adaptive=adaptive, max_grad_norm=1.0)
    model = TinyConvNet()
    train(SeqESAMTrainer, model, args, data, make_optimizer)
    ref = reference_sam(TinyConvNet(), data, 16, 4, make_optimizer, rho, adaptive, max_grad_norm=1.0)
    assert_same_params(model, ref)
    assert not torch.equal(model.head.weight, TinyConvNet().head.weight)


def test_rho_zero_equals_plain_trainer_with_one_pass_per_step(tmp_path):
    data = make_data(64)
    esam_model, plain_model = TinyConvNet(), TinyConvNet()
    forwards = []
    esam_model.register_forward_hook(lambda *a: forwards.append(1))
    train(SeqESAMTrainer, esam_model, make_args(tmp_path, esam_rho=0.0), data)
    train(SeqTrainer, plain_model, make_args(tmp_path / "plain"), data)
    assert len(forwards) == 4
    assert_same_params(esam_model, plain_model, atol=0, rtol=0)


def test_gradient_accumulation_rho_zero_matches_a_doubled_batch(tmp_path):
    data = make_data(64)
    a, b = TinyConvNet(batchnorm=False), TinyConvNet(batchnorm=False)
    train(SeqESAMTrainer, a, make_args(tmp_path / "a", esam_rho=0.0, per_device_train_batch_size=8,
                                       gradient_accumulation_steps=2), data)
    train(SeqESAMTrainer, b, make_args(tmp_path / "b", esam_rho=0.0, per_device_train_batch_size=16), data)
    assert_same_params(a, b)


def test_gradient_accumulation_with_sam_keeps_ascent_out_of_accumulated_grad(tmp_path):
    data = make_data(64)
    model = TinyConvNet()
    args = make_args(tmp_path, esam_rho=0.05, esam_beta=1.0, esam_gamma=1.0, per_device_train_batch_size=8,
                     gradient_accumulation_steps=2)
    train(SeqESAMTrainer, model, args, data)
    ref = reference_sam(TinyConvNet(), data, 8, 4, sgd, 0.05, False, accumulation=2)
    assert_same_params(model, ref)


def test_esam_trains_and_logs_its_statistics(tmp_path):
    data = make_data(64)
    model = TinyConvNet()
    trainer = train(SeqESAMTrainer, model, make_args(tmp_path, logging_steps=2), data)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert 0 < h["esam/swp_kept_fraction"] <= 1
        assert h["esam/ascent_grad_norm"] > 0
        assert h["esam/skipped_perturbations"] == 0
        assert "esam/sharpness" in h


def test_per_example_loss_func_hook_is_used(tmp_path):
    calls = []

    def focal_like(outputs, labels):
        calls.append(labels.shape[0])
        return 2.0 * F.cross_entropy(outputs.logits, labels, reduction="none")

    args = make_args(tmp_path, max_steps=1, esam_gamma=0.5, esam_selection="sharpness")
    train(SeqESAMTrainer, TinyConvNet(), args, make_data(16), per_example_loss_func=focal_like)
    assert calls == [16, 16]  # the clean and perturbed passes; the descent subset ranks nothing


def test_model_without_logits_gets_a_clear_error(tmp_path):
    class NoLogits(TinyConvNet):
        def forward(self, pixel_values, labels=None):
            logits = self.head(self.body(pixel_values))
            return {"loss": F.cross_entropy(logits, labels), "features": logits}

    with pytest.raises(ValueError, match="per_example_loss_func"):  # a descent on a subset must know the loss
        train(SeqESAMTrainer, NoLogits(), make_args(tmp_path, max_steps=1, esam_selection="random"), make_data(16))


def test_bf16_autocast_trains(tmp_path):
    model = TinyConvNet()
    before = params_of(model)
    trainer = train(SeqESAMTrainer, model, make_args(tmp_path, bf16=True), make_data(64))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert model.head.weight.dtype == torch.float32
    assert not torch.equal(before["head.weight"], model.head.weight)


@pytest.mark.parametrize("extra", [{}, {"esam_gamma_warmup": 0.5}], ids=["paper", "gamma_warmup"])
def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path, extra):
    data = make_data(128)
    full = TinyConvNet()
    train(SeqESAMTrainer, full, make_args(tmp_path / "full", max_steps=8, **extra), data)

    first = TinyConvNet()
    args = make_args(tmp_path / "resumed", max_steps=8, save_strategy="steps", save_steps=4, **extra)
    trainer = SeqESAMTrainer(model=first, args=args, train_dataset=data, optimizers=(sgd(first), None))
    # Stop after the checkpoint at step 4 (as a killed job would), then resume in a fresh trainer.
    from transformers import TrainerCallback

    class StopAt4(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            control.should_training_stop = True

    trainer.add_callback(StopAt4())
    trainer.train()
    ckpt = tmp_path / "resumed" / "checkpoint-4"
    assert (ckpt / "esam_state.pt").is_file()
    assert not torch.allclose(first.head.weight, full.head.weight)  # stopped half-way: not yet the full run

    second = TinyConvNet(seed=123)  # weights come from the checkpoint
    trainer = SeqESAMTrainer(model=second, args=args, train_dataset=data, optimizers=(sgd(second), None))
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert_same_params(second, full, atol=1e-6, rtol=1e-5)


def test_torch_compile_trains(tmp_path):
    model = TinyConvNet()
    before = params_of(model)
    args = make_args(tmp_path, max_steps=2, torch_compile=True, torch_compile_backend="aot_eager")
    trainer = train(SeqESAMTrainer, model, args, make_data(32))
    assert trainer.state.global_step == 2
    assert not torch.equal(before["head.weight"], model.head.weight)


def test_arguments_parse_save_and_validate(tmp_path):
    parser = HfArgumentParser(ESAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--esam_rho", "0.1", "--esam_beta", "0.5", "--esam_gamma", "0.7",
        "--esam_adaptive", "--esam_bn_stats", "all", "--use_cpu",
    ])
    assert (args.esam_rho, args.esam_beta, args.esam_gamma, args.esam_adaptive, args.esam_bn_stats) == (0.1, 0.5, 0.7, True, "all")
    saved = json.loads(args.to_json_string())
    assert saved["esam_rho"] == 0.1 and saved["esam_bn_stats"] == "all"
    for flag, value, match in [
        ("--esam_rho", "-1", "esam_rho must be a finite number >= 0"),
        ("--esam_beta", "0", r"esam_beta must be in \(0, 1\]"),
        ("--esam_gamma", "1.5", r"esam_gamma must be in \(0, 1\]"),
        ("--esam_gamma_warmup", "1.5", r"esam_gamma_warmup must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), flag, value])
    with pytest.raises(SystemExit):  # argparse choices
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--esam_bn_stats", "some"])
    with pytest.raises(ValueError, match="esam_bn_stats must be one of"):
        ESAMTrainingArguments(output_dir=str(tmp_path), esam_bn_stats="some")
    with pytest.raises(ValueError, match="esam_selection must be one of"):
        ESAMTrainingArguments(output_dir=str(tmp_path), esam_selection="hardest")


def test_plain_training_arguments_get_esam_training_arguments_defaults(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = ESAMTrainer(model=TinyConvNet(), args=args, train_dataset=make_data(16))
    esam = trainer._get_esam()
    assert (esam.rho, esam.beta, esam.gamma, esam.adaptive, esam.bn_stats, esam.selection) == (
        0.03, 0.6, 0.5, False, "clean", "ascent")
    ours = ESAMTrainingArguments(output_dir=str(tmp_path))
    assert (ours.esam_rho, ours.esam_beta, ours.esam_gamma, ours.esam_selection) == (0.03, 0.6, 0.5, "ascent")


@pytest.mark.parametrize("flag", ["deepspeed", "fsdp", "data_parallel"])
def test_unsupported_parallelism_is_refused(tmp_path, monkeypatch, flag):
    args = make_args(tmp_path)
    if flag == "data_parallel":
        monkeypatch.setattr(type(args), "n_gpu", property(lambda self: 2))
    else:
        monkeypatch.setattr(Trainer, "__init__", _fake_init(flag))
    with pytest.raises(ValueError, match="DDP"):
        ESAMTrainer(model=TinyConvNet(), args=args, train_dataset=make_data(16))


def _fake_init(flag):
    real_init = Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        setattr(self, f"is_{flag}_enabled", True)
    return init


@pytest.mark.parametrize("schedule, expected", [
    # linear: gamma_t = 1 - 0.5 * (t/8) / 0.5, k = ceil(16 gamma_t); the whole batch at t = 0
    ("linear", [16, 14, 12, 10, 8, 8, 8, 8]),
    # cosine: gamma_t = 1 - 0.5 * (1 - cos(pi (t/8) / 0.5)) / 2
    ("cosine", [16, 15, 12, 10, 8, 8, 8, 8]),
])
def test_gamma_warmup_schedule_gives_the_documented_k(tmp_path, schedule, expected):
    sizes = []
    model = TinyConvNet()
    model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    args = make_args(tmp_path, max_steps=8, esam_gamma=0.5, esam_gamma_warmup=0.5, esam_gamma_schedule=schedule,
                     esam_selection="sharpness")
    train(SeqESAMTrainer, model, args, make_data(128))
    descent_sizes = []
    i = 0
    while i < len(sizes):  # clean pass (16), then a no-grad pass (16) only when k < 16, then the descent pass (k)
        if sizes[i + 1] == 16 and i + 2 < len(sizes) and sizes[i + 2] < 16:
            descent_sizes.append(sizes[i + 2]); i += 3
        else:
            descent_sizes.append(sizes[i + 1]); i += 2
    assert descent_sizes == expected


def test_ddp_static_graph_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="ddp_static_graph"):
        ESAMTrainer(model=TinyConvNet(), args=make_args(tmp_path, ddp_static_graph=True), train_dataset=make_data(16))
    ESAMTrainer(model=TinyConvNet(), args=make_args(tmp_path, ddp_static_graph=True, esam_rho=0.0),
                train_dataset=make_data(16))  # plain training: DDP's static graph is fine


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def test_gradient_checkpointing_trains_as_without_and_reentrant_is_refused(tmp_path):
    ids = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(32)]
    with pytest.raises(ValueError, match="use_reentrant"):
        ESAMTrainer(model=_tiny_gpt2(), args=make_args(tmp_path, gradient_checkpointing=True,
                                                       gradient_checkpointing_kwargs={"use_reentrant": True}))
    models = {}
    for checkpointing in (False, True):
        models[checkpointing] = _tiny_gpt2()
        train(SeqESAMTrainer, models[checkpointing], make_args(tmp_path / str(checkpointing), per_device_train_batch_size=8,
                                                               max_steps=3, gradient_checkpointing=checkpointing), data)
    for (name, a), b in zip(models[True].named_parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_callback_freezing_a_layer_mid_training(tmp_path):
    from transformers import TrainerCallback

    class FreezeHeadAt2(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                model.head.weight.requires_grad_(False)
                self.frozen = model.head.weight.detach().clone()

    model, callback = TinyConvNet(), FreezeHeadAt2()
    train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=4), make_data(64), callbacks=[callback])
    assert torch.equal(model.head.weight, callback.frozen)


def test_sds_class_concentration_is_logged_and_warned_about(tmp_path):
    from collections import Counter

    from transformers.testing_utils import CaptureLogger

    import esam_hf.trainer as trainer_module

    model, forwards = TinyConvNet(), []
    model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["labels"].tolist()), with_kwargs=True)
    trainer = train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=2, logging_steps=1, esam_selection="sharpness"),
                    make_data(32))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for step, log in enumerate(logs):
        batch, _, descent = forwards[3 * step: 3 * step + 3]  # clean, selection, descent passes
        assert log["esam/sds_top_class_share"] == pytest.approx(Counter(descent).most_common(1)[0][1] / len(descent))
        assert log["esam/batch_top_class_share"] == pytest.approx(Counter(batch).most_common(1)[0][1] / len(batch))

    trainer._class_shares, trainer._class_share_steps, trainer._warned_concentration = None, 0, False
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    trainer._record_class_shares(labels, torch.tensor([0, 1, 2, 3]))  # 3 of 4 kept rows are class 0
    trainer._first_loss, trainer.state.global_step = None, 10
    with CaptureLogger(trainer_module.logger) as captured:  # the first logging step: nothing to compare with yet
        shares = trainer._pop_class_shares(loss=1.10)
    assert shares == {"esam/sds_top_class_share": 0.75, "esam/batch_top_class_share": 0.375}
    assert captured.out == ""
    trainer.state.global_step = 10 + trainer_module.STALL_STEPS
    trainer._record_class_shares(labels, torch.tensor([0, 1, 2, 3]))
    with CaptureLogger(trainer_module.logger) as captured:  # concentrated, but the loss is falling: healthy
        trainer._pop_class_shares(loss=0.70)
    assert captured.out == ""
    trainer._record_class_shares(labels, torch.tensor([0, 1, 2, 3]))
    trainer.state.global_step = 10 + trainer_module.STALL_STEPS - 1
    with CaptureLogger(trainer_module.logger) as captured:  # not falling, but too soon to tell
        trainer._pop_class_shares(loss=1.08)
    assert captured.out == ""
    trainer._record_class_shares(labels, torch.tensor([0, 1, 2, 3]))
    trainer.state.global_step = 10 + trainer_module.STALL_STEPS
    with CaptureLogger(trainer_module.logger) as captured:  # concentrated on a plateau: the stall it predicts
        trainer._pop_class_shares(loss=1.08)
    assert "SDS is descending on one class at a time" in captured.out


# --------------------------------------------------------------------------- #
# A run that goes wrong says so
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("overrides, match", [
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number >= 0"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number >= 0"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
    ({"max_steps": 0}, "max_steps must be > 0"),
    ({"max_steps": -1, "num_train_epochs": -2}, "num_train_epochs must be a finite number > 0"),
])
def test_arguments_that_would_train_nothing_or_nan_are_refused_by_train(tmp_path, overrides, match):
    args = make_args(tmp_path, **overrides)  # builds, as TrainingArguments does (evaluation-only scripts)
    model = TinyConvNet()
    before = params_of(model)
    trainer = SeqESAMTrainer(model=model, args=args, train_dataset=make_data(16), eval_dataset=make_data(16))
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in params_of(model).items())


def test_an_evaluation_only_script_builds_and_evaluates(tmp_path):
    args = make_args(tmp_path, max_steps=0, max_grad_norm=None)
    trainer = ESAMTrainer(model=TinyConvNet(), args=args, eval_dataset=make_data(16))
    reference = Trainer(model=TinyConvNet(), args=TrainingArguments(str(tmp_path), max_steps=0, use_cpu=True,
                                                                    report_to="none"), eval_dataset=make_data(16))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(reference.evaluate()["eval_loss"])


@pytest.mark.parametrize("optim", ["lomo", "adalomo", "galore_adamw_layerwise", "apollo_adamw_layerwise"])
def test_optimizers_that_step_inside_the_backward_are_refused(tmp_path, optim):
    args = make_args(tmp_path, optim=optim)
    trainer = SeqESAMTrainer(model=TinyConvNet(), args=args, train_dataset=make_data(16))
    with pytest.raises(ValueError, match=f"optim='{optim}' updates the weights inside the backward pass"):
        trainer.train()


class NaNAtPerturbedWeights(TinyConvNet):
    """Returns NaN logits in the descent pass (the second forward) of the given steps."""

    def __init__(self, nan_steps):
        super().__init__()
        self.nan_steps, self.calls = nan_steps, 0

    def forward(self, pixel_values, labels=None):
        out = super().forward(pixel_values, labels)
        self.calls += 1
        if self.training and (self.calls - 1) // 2 in self.nan_steps and self.calls % 2 == 0:
            nan = out.logits * float("nan")
            return ImageClassifierOutput(loss=F.cross_entropy(nan, labels), logits=nan)
        return out


def test_a_non_finite_descent_gradient_never_reaches_the_weights(tmp_path):
    model = NaNAtPerturbedWeights(nan_steps={0})
    before = params_of(model)
    args = make_args(tmp_path, esam_beta=1.0, esam_gamma=1.0, max_steps=1)
    trainer = train(SeqESAMTrainer, model, args, make_data(64))
    assert trainer.nonfinite_guard.skipped == 1
    # The gradient became 0: the first SGD step (lr 0.1, weight decay 5e-4, no momentum yet) only decays.
    for k, v in params_of(model).items():
        if "running" not in k and "num_batches" not in k:  # BN statistics come from the clean pass at w
            torch.testing.assert_close(v, before[k] * (1 - 0.1 * 5e-4), rtol=0, atol=1e-7, msg=k)

    # Later steps train as usual: the skipped step leaves no NaN behind.
    model = NaNAtPerturbedWeights(nan_steps={1})
    trainer = train(SeqESAMTrainer, model, make_args(tmp_path, esam_beta=1.0, esam_gamma=1.0, max_steps=4), make_data(64))
    assert trainer.nonfinite_guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.head.weight, TinyConvNet().head.weight)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_sgd"])
def test_a_fused_optimizer_skips_a_non_finite_step_on_the_device_once_its_state_exists(tmp_path, fused):
    """A fused optimizer is told through found_inf and skips the whole update (weights and momentum as after the
    previous step); its first step, before any momentum buffer exists, falls back to zeroing the gradient."""
    def opt(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused)

    snapshots = {}

    class Snap(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = optimizer.optimizer
            snapshots[state.global_step] = (params_of(model), [inner.state[p]["momentum_buffer"].clone()
                                                              for p in model.parameters()])

    model = NaNAtPerturbedWeights(nan_steps={0, 2})
    args = make_args(tmp_path, esam_beta=1.0, esam_gamma=1.0, max_steps=4)
    trainer = SeqESAMTrainer(model=model, args=args, train_dataset=make_data(64), optimizers=(opt(model), None),
                             callbacks=[Snap()])
    trainer.train()
    assert trainer.nonfinite_guard.skipped == 2
    (w2, m2), (w3, m3) = snapshots[2], snapshots[3]
    for k, v in w3.items():
        if "running" not in k and "num_batches" not in k:
            if fused:  # skipped on the device: nothing moved
                assert torch.equal(v, w2[k]), k
            else:  # zeroed gradient: momentum and weight decay still move the weights
                assert not torch.equal(v, w2[k]), k
    assert all(torch.equal(a, b) for a, b in zip(m2, m3)) == fused
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in m3)  # no uninitialised momentum from the skipped first step


def test_a_diverging_run_raises_instead_of_reporting_success(tmp_path):
    from esam_hf.trainer import TrainingDiverged

    model = TinyConvNet()
    args = make_args(tmp_path, max_steps=30, learning_rate=0.05)
    with pytest.raises(TrainingDiverged, match="training diverged"):
        train(SeqESAMTrainer, model, args, make_data(64), make_optimizer=lambda m: torch.optim.SGD(
            m.parameters(), lr=0.05, weight_decay=1e6))


@pytest.mark.parametrize("damaged", ["esam_state.pt", "optimizer.pt", "model.safetensors"])
def test_a_damaged_checkpoint_file_is_named(tmp_path, damaged):
    data = make_data(64)
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    train(SeqESAMTrainer, TinyConvNet(), args, data)
    ckpt = tmp_path / "checkpoint-2"
    path = ckpt / damaged
    assert path.is_file()
    path.write_bytes(path.read_bytes()[:50])  # a run killed while saving
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = SeqESAMTrainer(model=TinyConvNet(), args=args, train_dataset=data, optimizers=(sgd(TinyConvNet()), None))
    with pytest.raises(RuntimeError, match="checkpoint-2.*damaged"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_fp16_on_a_cpu_runs_no_scaler_so_the_guard_stays_on_and_the_card_says_fp32(tmp_path):
    from esam_hf.hub import run_precision

    model = NaNAtPerturbedWeights(nan_steps={0})
    args = make_args(tmp_path, esam_beta=1.0, esam_gamma=1.0, max_steps=3, fp16=True)
    trainer = train(SeqESAMTrainer, model, args, make_data(64))
    assert trainer.accelerator.scaler is None
    assert trainer.nonfinite_guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert run_precision(trainer).startswith("fp32 (fp16 was requested; it does not run on this device")


class HostReads:
    """Counts reads of tensor values on the host (`item`, `tolist`, `bool`, `float`, `int`, `numpy`): on a GPU
    each is a device synchronisation. The SWP mask, drawn on the host from a CPU generator by design
    (`ESAM._draw_kept`), never touches the device and is not counted. On a GPU,
    `torch.cuda.set_sync_debug_mode("error")` is the equivalent check."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")

    def __init__(self, monkeypatch):
        import sys

        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if sys._getframe(1).f_code.co_name != "_draw_kept":
                    self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("method", ["trainer", "sgd", "sam", "esam", "random", "ascent"])
def test_no_host_read_inside_a_training_step(tmp_path, monkeypatch, method):
    esam = {"sgd": dict(esam_rho=0.0), "sam": dict(esam_beta=1.0, esam_gamma=1.0), "esam": {},
            "random": dict(esam_selection="random"), "ascent": dict(esam_selection="ascent")}.get(method, {})
    counts = {}
    for steps in (3, 8):
        reads = HostReads(monkeypatch)
        args = make_args(tmp_path, max_steps=steps, logging_steps=1000, logging_nan_inf_filter=False, max_grad_norm=1.0,
                         **esam)
        train(Trainer if method == "trainer" else SeqESAMTrainer, TinyConvNet(), args, make_data(160))
        counts[steps] = reads.count
        monkeypatch.undo()
    # Reads at the start and end of training are the same for both lengths; per-step reads would add up.
    assert counts[8] == counts[3], counts


def test_the_host_read_counter_sees_a_per_step_sync(tmp_path, monkeypatch):
    counts = {}
    for steps in (3, 8):  # the Trainer's own NaN filter reads the loss at every step
        reads = HostReads(monkeypatch)
        train(SeqESAMTrainer, TinyConvNet(), make_args(tmp_path, max_steps=steps, logging_steps=1000), make_data(160))
        counts[steps] = reads.count
        monkeypatch.undo()
    assert counts[8] - counts[3] >= 5, counts


# --------------------------------------------------------------------------- #
# Drop-in: models the Trainer trains, trained the same way under the defaults
# --------------------------------------------------------------------------- #
def test_a_custom_module_trains_under_the_defaults_as_a_hand_written_esam_step(tmp_path):
    from esam_hf import ESAM

    data = make_data(32)
    model = PlainNet()
    trainer = train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=2, esam_rho=0.1, esam_selection="sharpness"),
                    data)
    assert trainer._head == "classification" and trainer._head_inferred
    # Independent reference: the core with a hand-written per-example cross-entropy, same seed and batches.
    ref = PlainNet()
    opt = sgd(ref)
    esam = ESAM(ref, rho=0.1, beta=0.6, gamma=0.5, seed=0)

    def loss_fn(b):
        losses = F.cross_entropy(ref(b[0])["logits"], b[1], reduction="none")
        return losses.mean(), losses.detach()

    for x, y in list(batches(data, 16))[:2]:
        esam.step(loss_fn, (x, y))
        opt.step()
        opt.zero_grad()
    assert_same_params(model, ref)


def test_ascent_selection_trains_as_a_hand_written_loop_of_the_core(tmp_path):
    """ESAMTrainer in the "ascent" mode against the core driven by hand on the same batches and the same random
    rows (the core's step is checked against a written-out step in test_esam)."""
    from esam_hf import ESAM

    rows = []

    class Recorded(ESAM):
        def _random_rows(self, batch_size, k, like):
            if rows_to_replay:
                return rows_to_replay.pop(0)
            index = super()._random_rows(batch_size, k, like)
            rows.append(index.clone())
            return index

    rows_to_replay = []
    data = make_data(32)
    model = TinyConvNet()
    trainer = SeqESAMTrainer(model=model, args=make_args(tmp_path, max_steps=2, esam_rho=0.1, esam_selection="ascent"),
                             train_dataset=data, optimizers=(sgd(model), None))
    recorded = Recorded(model, rho=0.1, beta=0.6, gamma=0.5, seed=0, selection="ascent")

    def get_esam():  # the recording instance, where train() would build a plain one
        trainer.esam = recorded
        return recorded

    trainer._get_esam = get_esam
    trainer.train()
    assert len(rows) == 2 and all(r.shape == (8,) for r in rows)
    ref = TinyConvNet()
    opt = sgd(ref)
    rows_to_replay = [r.clone() for r in rows]
    esam = Recorded(ref, rho=0.1, beta=0.6, gamma=0.5, seed=0, selection="ascent")

    def loss_fn(b):
        losses = F.cross_entropy(ref(b[0]).logits, b[1], reduction="none")
        return losses.mean(), losses.detach()

    for x, y in list(batches(data, 16))[:2]:
        esam.step(loss_fn, (x, y))
        opt.step()
        opt.zero_grad()
    assert not rows_to_replay
    assert_same_params(model, ref)


def test_a_guessed_head_whose_scores_do_not_reduce_to_the_models_loss_is_refused(tmp_path):
    model = PlainNet(loss="contrastive")
    before = params_of(model)
    with pytest.raises(ValueError, match=r"cannot tell which loss PlainNet trains \(the mean of its per-example "
                                         r"classification losses is .* but it returned loss .*esam_gamma=1 keeps"):
        train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=1, esam_selection="sharpness"), make_data(16))
    assert all(torch.equal(v, before[k]) for k, v in params_of(model).items())
    # Random selection needs no scores to rank, but the subset still changes such a loss: refused too.
    with pytest.raises(ValueError, match="esam_gamma=1 keeps the objective"):
        train(SeqESAMTrainer, PlainNet(loss="contrastive"), make_args(tmp_path, max_steps=1, esam_selection="random"),
              make_data(16))
    # gamma = 1 keeps any objective: it trains.
    train(SeqESAMTrainer, PlainNet(loss="contrastive"), make_args(tmp_path, max_steps=1, esam_gamma=1.0), make_data(16))


def test_an_ascent_on_a_subset_trains_any_loss_with_the_whole_batchs_objective(tmp_path):
    """selection "ascent" on a loss that is not a mean over examples (in-batch contrastive): no refusal, and the
    descent is the whole batch's own loss at w + e, e aimed by the subset's loss (hand-written, same rows)."""
    data = make_data(16)
    model = PlainNet(loss="contrastive")
    before = params_of(model)
    trainer = train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=1, esam_rho=0.1, esam_beta=1.0,
                                                     esam_selection="ascent"), data)
    rows = trainer.esam.last_selection.clone()
    ref = PlainNet(loss="contrastive")
    ref.load_state_dict(before)
    x, y = next(batches(data, 16))
    params = list(ref.parameters())
    grads = torch.autograd.grad(ref(x[rows], y[rows])["loss"], params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(0.1 * g / (norm + 1e-12))
    ref(x, y)["loss"].backward()
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(0.1 * g / (norm + 1e-12))
    opt = sgd(ref)
    opt.step()
    assert_same_params(model, ref)


def test_frozen_integer_and_float8_weights_do_not_break_the_end_of_training(tmp_path):
    class Quantised(TinyConvNet):
        def __init__(self):
            super().__init__()
            self.packed = torch.nn.Parameter(torch.randint(0, 255, (8,), dtype=torch.uint8), requires_grad=False)
            self.scales = torch.nn.Parameter(torch.ones(4).to(torch.float8_e4m3fn), requires_grad=False)

    model = Quantised()
    trainer = train(SeqESAMTrainer, model, make_args(tmp_path, max_steps=2), make_data(32))
    assert trainer.state.global_step == 2 and model.packed.dtype == torch.uint8


def test_batch_size_one_warns_that_sds_is_off(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="esam_hf.trainer"):
        train(SeqESAMTrainer, TinyConvNet(), make_args(tmp_path, max_steps=3, per_device_train_batch_size=1), make_data(4))
    assert sum("SDS is off: at per_device_train_batch_size 1" in r.message for r in caplog.records) == 1


def test_compute_loss_overrides_see_which_pass_runs(tmp_path):
    seen = []

    class Counting(SeqESAMTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            seen.append(self.esam_pass)
            return super().compute_loss(model, inputs, **kwargs)

    train(Counting, TinyConvNet(), make_args(tmp_path, max_steps=2, esam_selection="sharpness"), make_data(32))
    assert seen == ["clean", "perturbed", "descent"] * 2
    seen.clear()
    train(Counting, TinyConvNet(), make_args(tmp_path, max_steps=1, esam_selection="random"), make_data(32))
    assert seen == ["clean", "descent"]


def test_weights_that_end_non_finite_fail_the_run(tmp_path):
    from transformers import TrainerCallback

    from esam_hf.trainer import TrainingDiverged

    class Corrupt(TrainerCallback):  # finite gradients all along, but the last update leaves an inf weight
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == args.max_steps:
                with torch.no_grad():
                    model.head.bias[0] = float("inf")

    with pytest.raises(TrainingDiverged, match="weights are no longer finite"):
        train(SeqESAMTrainer, TinyConvNet(), make_args(tmp_path, max_steps=2), make_data(32), callbacks=[Corrupt()])
