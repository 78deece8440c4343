"""Two real processes on CPU (gloo) via torchrun."""

import torch

from helpers import PlainNet, SeqESAMTrainer, TinyConvNet, make_args, make_data, run_two_processes, train


def test_esam_keeps_ranks_identical(tmp_path):
    r0, r1 = run_two_processes(tmp_path, "esam")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["kept"] == r1["kept"]  # same SWP draws on both ranks
    assert r0["sizes"] == r1["sizes"] and len(set(r0["sizes"])) > 2  # same scheduled k on both ranks
    initial = TinyConvNet().state_dict()
    for k, v in r0["state"].items():
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics are per rank (DDP broadcasts rank 0's buffers each forward)
        assert torch.equal(v, r1["state"][k]), k
        assert not torch.equal(v, initial[k]), k


def test_rho_zero_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    r0, r1 = run_two_processes(tmp_path, "rho0")
    single = TinyConvNet(batchnorm=False)
    train(SeqESAMTrainer, single, make_args(tmp_path / "single", esam_rho=0.0, per_device_train_batch_size=16,
                                            max_steps=3), make_data(64))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, atol=1e-6, rtol=1e-5, msg=k)
        assert torch.equal(r0["state"][k], r1["state"][k])


def test_ddp_with_a_trainable_tensor_unused_in_the_forward(tmp_path):
    r0, r1 = run_two_processes(tmp_path, "unused")
    assert r0["world_size"] == 2
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    assert torch.equal(r0["state"]["unused"], torch.zeros(3))
    assert not torch.equal(r0["state"]["head.weight"], TinyConvNet(batchnorm=False).state_dict()["head.weight"])


def test_a_custom_module_trains_under_the_defaults_in_two_processes(tmp_path):
    r0, r1 = run_two_processes(tmp_path, "custom")
    initial = PlainNet().state_dict()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
        assert not torch.equal(v, initial[k]), k
