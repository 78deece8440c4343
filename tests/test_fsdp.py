"""ESAM on a model sharded with FSDP2's fully_shard: two gloo processes against a hand-written
single-process reference that perturbs with the global batch's gradient (float64)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoModelForImageClassification

from fsdp_case import ACCUMULATION, BATCH, MODES, WORLD, build_model, esam_kwargs, rank_batches, trainer_case
from helpers import SeqESAMTrainer, run_two_processes


def reference_gradients(mode: str, rho: float | None = None) -> dict[str, torch.Tensor]:
    """The gradient an optimizer sees after ACCUMULATION ESAM micro-steps on WORLD ranks, computed in one
    process: the ascent direction is the gradient of the mean over ranks of each rank's mean loss, its norm
    spans every (kept) tensor, each rank selects its own k examples by l_i(w + e) - l_i(w), and the descent
    gradients are averaged over ranks and summed over micro-batches (each divided by ACCUMULATION)."""
    kw = esam_kwargs(mode)
    rho = kw["rho"] if rho is None else rho
    beta, gamma, adaptive = kw["beta"], kw["gamma"], kw.get("adaptive", False)
    model = build_model()
    names, params = zip(*model.named_parameters())
    generator = torch.Generator().manual_seed(kw["seed"])
    total = [torch.zeros_like(p) for p in params]
    for micro in range(ACCUMULATION):
        batches = [rank_batches(r)[micro] for r in range(WORLD)]
        loss = sum(F.cross_entropy(model(x), y) for x, y in batches) / WORLD
        grads = torch.autograd.grad(loss, params)
        mask = [True] * len(params)
        if beta < 1:
            mask = torch.rand(len(params), generator=generator) < beta
            if not mask.any():
                mask[torch.randint(len(params), (1,), generator=generator)] = True
            mask = mask.tolist()
        with torch.no_grad():
            clean = [F.cross_entropy(model(x), y, reduction="none") for x, y in batches]
            direction = [(p * p * g if adaptive else g) for p, g, m in zip(params, grads, mask) if m]
            scaled = [(p.abs() * g if adaptive else g) for p, g, m in zip(params, grads, mask) if m]
            norm = math.sqrt(sum(float(s.pow(2).sum()) for s in scaled))
            kept = [p for p, m in zip(params, mask) if m]
            saved = [p.clone() for p in kept]
            for p, d in zip(kept, direction):
                p.add_(d * (rho / beta / (norm + 1e-12)))
        k = max(1, math.ceil(gamma * BATCH - 1e-9))
        for (x, y), at_w in zip(batches, clean):
            if k < BATCH:
                with torch.no_grad():
                    rise = F.cross_entropy(model(x), y, reduction="none") - at_w
                rows = rise.topk(k).indices
                x, y = x[rows], y[rows]
            descent = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            for t, g in zip(total, descent):
                t.add_(g / WORLD / ACCUMULATION)
        with torch.no_grad():
            for p, s in zip(kept, saved):
                p.copy_(s)
    return dict(zip(names, total))


@pytest.fixture(scope="module")
def core_runs(tmp_path_factory):
    return run_two_processes(tmp_path_factory.mktemp("core"), "core", worker="fsdp_worker.py")


@pytest.mark.parametrize("mode", list(MODES))
def test_fully_sharded_esam_equals_the_global_batch_reference(core_runs, mode):
    ranks = [r[mode] for r in core_runs]
    assert core_runs[0]["world_size"] == core_runs[1]["world_size"] == 2
    expected = reference_gradients(mode)
    plain = reference_gradients(mode, rho=0.0)
    for r in ranks:
        assert r["restored"]  # the weights are back bit for bit after the steps
        for name, g in expected.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-10, atol=1e-13, msg=name)
    # The perturbation changed the gradient (the comparison can tell ESAM from plain training).
    assert any(not torch.allclose(expected[n], plain[n], rtol=1e-4, atol=1e-8) for n in expected)
    if mode != "sam":  # each rank chose its own examples
        assert ranks[0]["selection"].numel() == ranks[1]["selection"].numel() == BATCH // 2


def single_process_run(tmp_path, mode):
    model, args, data = trainer_case(str(tmp_path / "single"), mode, fsdp=False)
    trainer = SeqESAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode", ["trainer", "trainer_accum", "trainer_ram", "trainer_resume", "trainer_sharded_resume",
                                  "trainer_bf16", "trainer_nan"])
def test_esam_trainer_under_fsdp2_equals_one_process_on_the_global_batch(tmp_path, mode):
    """Two ranks sharded by the Trainer's FSDP2 (accelerate) train as one process on their joint batches: the
    ascent is the global batch's, SWP draws the same tensors; with accumulation, with rank-0 loading
    (cpu_ram_efficient_loading), stopped at a checkpoint then resumed by a fresh trainer, in bf16, and with a
    NaN image in one rank's batch (its step runs on a zero gradient on every rank, as in one process)."""
    ranks = run_two_processes(tmp_path, mode, worker="fsdp_worker.py")
    single = single_process_run(tmp_path, mode.replace("_resume", "").replace("_sharded", ""))
    initial = trainer_case(str(tmp_path / "unused"), mode, fsdp=False)[0].state_dict()
    single_logs = [h for h in single.state.log_history if "loss" in h]
    for r in ranks:
        assert r["world_size"] == 2 and r["sharded"] == "DTensor"  # the Trainer's FSDP2 really sharded the model
        for name, p in single.model.named_parameters():
            if mode == "trainer_bf16":  # FSDP2 casts the gathered weights, autocast the ops: agree to bf16 rounding
                update = (p.detach() - initial[name]).abs().max()
                assert (r["state"][name] - p.detach()).abs().max() <= 0.05 * update + 1e-6, name
            else:
                torch.testing.assert_close(r["state"][name], p.detach(), rtol=1e-4, atol=2e-6, msg=name)
        assert r["skipped"] == single.nonfinite_guard.skipped == (1 if mode == "trainer_nan" else 0)
        assert all(torch.isfinite(v).all() for v in r["state"].values())
        if "resume" in mode:  # ESAM's state beside FSDP's (sharded: one file per rank in a folder)
            assert "esam_state.pt" in r["checkpoint"]
            assert ("pytorch_model_fsdp_0" in r["checkpoint"]) == ("sharded" in mode), r["checkpoint"]
        else:  # (the resumed half logs only its own steps)
            assert r["kept"] == [h["esam/swp_kept_fraction"] for h in single_logs]
    assert any(not torch.equal(single.model.state_dict()[n], initial[n]) for n in initial)
    # save_model under FSDP2 writes a normal folder the Auto classes load, holding the trained weights (with
    # sharded checkpoints too, where Trainer.save_model alone writes nothing).
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p.detach(), ranks[0]["state"][name], rtol=0, atol=0, msg=name)


def test_the_example_accelerate_config_is_fsdp2():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(Path(__file__).resolve().parents[1] / "examples" / "accelerate_fsdp2.yaml")
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model gathers a Hub folder
    assert config.fsdp_config["fsdp_sync_module_states"]  # accelerate requires it with cpu_ram_efficient_loading


def test_esam_hf_train_under_fsdp2_saves_a_cifar_model_others_can_load(tmp_path):
    """`esam-hf train` under FSDP2: the paper's SGD is built by the Trainer (FSDP refuses a ready optimizer), and
    the saved folder carries the CIFAR model's own code, not the code of the class fully_shard made on the fly."""
    import subprocess
    import sys

    run_two_processes(tmp_path, "cli", worker="fsdp_worker.py")
    folder = tmp_path / "run"
    assert json.loads((folder / "esam_run.json").read_text())["status"] == "finished"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_esam_cifar.TimmWrapperForImageClassification"
    assert not list(folder.glob("_fsdp*.py")) and (folder / "modeling_esam_cifar.py").is_file()
    script = f"""
import sys, torch
sys.modules["esam_hf"] = None  # not installed, as far as this process can tell
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
print(type(model).__name__, model(torch.zeros(1, 3, 32, 32)).logits.shape[-1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["TimmWrapperForImageClassification", "10"]
