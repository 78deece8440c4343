"""The torch-only core against independent hand-written references."""

import dataclasses
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from transformers.modeling_outputs import ImageClassifierOutput

from esam_hf import ESAM
from esam_hf.esam import check_esam_args

from helpers import TinyConvNet


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def loss_fn_for(model, seen=None):
    def loss_fn(b):
        x, y = b
        if seen is not None:
            seen.append(x.detach().clone())
        losses = F.cross_entropy(model(x).logits, y, reduction="none")
        return losses.mean(), losses.detach()
    return loss_fn


def swp_mask(seed, n, beta):
    """The documented SWP draw: per tensor, kept with probability beta from a CPU generator seeded with `seed`."""
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < beta).tolist()


def test_restores_weights_bit_exactly_and_leaves_descent_gradient():
    model = TinyConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    esam = ESAM(model, rho=0.5, beta=0.6, gamma=0.5, seed=3)
    esam.step(loss_fn_for(model), batch())
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_restores_weights_when_the_step_raises():
    model = TinyConvNet()
    before = [p.detach().clone() for p in model.parameters()]
    esam = ESAM(model, rho=0.5, beta=1.0, gamma=0.5)
    calls = []

    def failing(b):
        calls.append(1)
        if len(calls) == 3:  # the descent pass, at w + e
            raise RuntimeError("boom")
        return loss_fn_for(model)(b)

    with pytest.raises(RuntimeError, match="boom"):
        esam.step(failing, batch())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_swp_perturbs_kept_tensors_by_rho_over_beta_and_skips_dropped_weight_gradients():
    model = TinyConvNet()
    params = list(model.parameters())
    rho, beta, seed = 0.3, 0.5, 11
    keep = swp_mask(seed, len(params), beta)
    assert 0 < sum(keep) < len(params)
    w0 = [p.detach().clone() for p in params]
    x, y = batch()

    # Independent reference direction: gradient of the clean loss, kept tensors only.
    ref_model = TinyConvNet()
    ref_loss = F.cross_entropy(ref_model(x).logits, y)
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    kept_grads = [g for g, k in zip(ref_grads, keep) if k]
    norm = torch.sqrt(sum((g ** 2).sum() for g in kept_grads))

    seen_weights = []
    fired = {i: 0 for i in range(len(params))}
    for i, p in enumerate(params):
        p.register_hook(lambda g, i=i: fired.__setitem__(i, fired[i] + 1))
    calls = []

    def loss_fn(b):
        calls.append(1)
        if len(calls) == 2:  # descent pass (gamma = 1): weights are at w + e
            seen_weights.append([p.detach().clone() for p in params])
        return loss_fn_for(model)(b)

    ESAM(model, rho=rho, beta=beta, gamma=1.0, seed=seed).step(loss_fn, (x, y))
    e = [s - w for s, w in zip(seen_weights[0], w0)]
    for i, k in enumerate(keep):
        if k:
            expected = rho / beta * ref_grads[i] / norm
            torch.testing.assert_close(e[i], expected, atol=1e-6, rtol=1e-4)
            assert fired[i] == 2  # ascent and descent
        else:
            assert torch.equal(e[i], torch.zeros_like(e[i]))
            assert fired[i] == 1  # descent only: no weight gradient in the ascent pass
    total = torch.sqrt(sum((t ** 2).sum() for t in e))
    assert math.isclose(total.item(), rho / beta, rel_tol=1e-5)
    assert all(p.grad is not None for p in params)  # every parameter gets a descent gradient


class ConvBackwardCounter(TorchDispatchMode):
    """Counts weight-gradient computations of convolutions."""

    def __init__(self):
        super().__init__()
        self.weight_grads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.weight_grads += int(args[-1][1])
        return func(*args, **(kwargs or {}))


def test_swp_skips_conv_weight_gradient_kernels():
    model = TinyConvNet()
    params = list(model.parameters())
    conv_weights = [i for i, p in enumerate(params) if p.dim() == 4]
    for seed in range(50):  # find a seed whose mask drops exactly one of the two conv weights
        keep = swp_mask(seed, len(params), 0.5)
        if sum(keep[i] for i in conv_weights) == 1:
            break
    with ConvBackwardCounter() as counter:
        ESAM(model, rho=0.1, beta=0.5, gamma=1.0, seed=seed).step(loss_fn_for(model), batch())
    assert counter.weight_grads == 1 + 2  # ascent: the kept conv only; descent: both


def reference_losses(x, y, rho):
    """Independent reference: per-example losses at w and at the SAM point w + rho g/||g||
    of a fresh TinyConvNet (BatchNorm statistics frozen there by momentum 0)."""
    ref = TinyConvNet()
    clean = F.cross_entropy(ref(x).logits, y, reduction="none")
    grads = torch.autograd.grad(clean.mean(), list(ref.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p.add_(rho * g / norm)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.0
        return clean.detach(), F.cross_entropy(ref(x).logits, y, reduction="none")


def test_sds_descends_on_the_k_sharpest_examples():
    model = TinyConvNet()
    x, y = batch(n=15)
    rho, gamma = 0.5, 0.4
    k = math.ceil(gamma * 15)
    clean, perturbed = reference_losses(x, y, rho)
    expected = set((perturbed - clean).topk(k).indices.tolist())

    seen = []
    ESAM(model, rho=rho, beta=1.0, gamma=gamma).step(loss_fn_for(model, seen), (x, y))
    assert [s.shape[0] for s in seen] == [15, 15, k]
    chosen = {next(i for i in range(15) if torch.equal(x[i], row)) for row in seen[2]}
    assert chosen == expected


def test_sds_keeps_at_least_one_example():
    model = TinyConvNet()
    seen = []
    ESAM(model, rho=0.1, beta=1.0, gamma=0.01).step(loss_fn_for(model, seen), batch(n=8))
    assert seen[-1].shape[0] == 1


def test_step_has_no_host_synchronisation():
    # On the meta device every value is unknown: .item(), bool(tensor) and boolean-mask
    # indexing all raise, so a step that finishes here never waits for the device.
    with torch.device("meta"):
        model = TinyConvNet()
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    esam = ESAM(model, rho=0.05, beta=0.6, gamma=0.5, adaptive=True)
    for _ in range(2):
        esam.step(loss_fn_for(model), (x, y))
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def test_non_finite_ascent_gradient_skips_the_perturbation():
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("inf"))

    model, ref = TinyConvNet(), TinyConvNet()
    for m in (model, ref):
        m.eval()  # no BatchNorm statistics: the plain-descent reference must see the same normalisation
    x, y = batch()
    calls = []

    def loss_fn(b):
        calls.append(1)
        logits = model(b[0]).logits
        if len(calls) == 1:
            logits = InfGrad.apply(logits)
        losses = F.cross_entropy(logits, b[1], reduction="none")
        return losses.mean(), losses.detach()

    esam = ESAM(model, rho=0.5, beta=1.0, gamma=1.0)
    esam.step(loss_fn, (x, y))
    F.cross_entropy(ref(x).logits, y).backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad)
    assert esam.pop_stats()["esam/skipped_perturbations"] == 1


def test_bn_stats_clean_updates_running_statistics_only_at_w():
    x, y = batch()
    stats = {}
    for mode in ("clean", "all"):
        model = TinyConvNet()
        ESAM(model, rho=0.5, beta=1.0, gamma=0.5, bn_stats=mode).step(loss_fn_for(model), (x, y))
        stats[mode] = model.body[1]
    ref = TinyConvNet()
    ref(x)  # one clean forward pass in train mode
    torch.testing.assert_close(stats["clean"].running_mean, ref.body[1].running_mean)
    assert stats["clean"].num_batches_tracked.item() == 1
    assert stats["all"].num_batches_tracked.item() == 3
    assert stats["clean"].track_running_stats and stats["all"].track_running_stats


def test_rho_zero_is_one_plain_forward_backward():
    model, ref = TinyConvNet(), TinyConvNet()
    seen = []
    x, y = batch()
    ESAM(model, rho=0.0).step(loss_fn_for(model, seen), (x, y))
    F.cross_entropy(ref(x).logits, y).backward()
    assert len(seen) == 1
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad)


def test_state_dict_round_trip_continues_the_swp_draws():
    a, b = ESAM(TinyConvNet(), seed=5), ESAM(TinyConvNet(), seed=99)
    a._draw_kept(a.params)
    b.load_state_dict(a.state_dict())
    assert [p.shape for p in a._draw_kept(a.params)] == [p.shape for p in b._draw_kept(b.params)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, "rho must be a finite number >= 0"),
        ({"rho": float("nan")}, "rho must be a finite number >= 0"),
        ({"rho": float("inf")}, "rho must be a finite number >= 0"),
        ({"beta": 0.0}, r"beta must be in \(0, 1\]"),
        ({"beta": 1.5}, r"beta must be in \(0, 1\]"),
        ({"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ({"gamma": -1}, r"gamma must be in \(0, 1\]"),
        ({"bn_stats": "some"}, "bn_stats must be one of"),
        ({"selection": "hardest"}, "selection must be one of"),
    ],
)
def test_invalid_hyper_parameters_are_refused(kwargs, match):
    args = {"rho": 0.05, "beta": 0.6, "gamma": 0.5, "bn_stats": "clean", **kwargs}
    with pytest.raises(ValueError, match=match):
        check_esam_args(**args)
    with pytest.raises(ValueError, match="esam_" + match.split()[0]):
        check_esam_args(**args, prefix="esam_")
    with pytest.raises(ValueError, match=match):
        ESAM(TinyConvNet(), **args)


def test_fp16_grad_scaler_scales_the_ascent_and_overflow_is_skipped():
    x, y = batch()
    grads = {}
    for name, init_scale in (("plain", None), ("scaled", 1024.0)):
        model = TinyConvNet()
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if init_scale else None
        with torch.autocast("cpu", dtype=torch.float16):
            ESAM(model, rho=0.05, beta=1.0, gamma=1.0).step(
                loss_fn_for(model), (x, y), grad_scaler=scaler,
                backward=(lambda l: scaler.scale(l).backward()) if scaler else None)
        grads[name] = [p.grad / (init_scale or 1.0) for p in model.parameters()]
    for a, b in zip(grads["plain"], grads["scaled"]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)

    # A scale that overflows fp16 activations' gradients: the ascent gradient is inf.
    model = TinyConvNet()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    esam = ESAM(model, rho=0.05, beta=1.0, gamma=0.5)
    with torch.autocast("cpu", dtype=torch.float16):
        esam.step(loss_fn_for(model), (x, y), grad_scaler=scaler, backward=lambda l: scaler.scale(l).backward())
    scaler.step(optimizer)
    scaler.update()
    assert esam.pop_stats()["esam/skipped_perturbations"] == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # restored, step skipped
    assert scaler.get_scale() < 2.0 ** 100


def test_loss_selection_descends_on_the_k_highest_perturbed_losses():
    model = TinyConvNet()
    x, y = batch(n=12)
    rho, k = 0.5, 6
    _, perturbed = reference_losses(x, y, rho)
    expected = set(perturbed.topk(k).indices.tolist())
    seen = []
    ESAM(model, rho=rho, beta=1.0, gamma=0.5, selection="loss").step(loss_fn_for(model, seen), (x, y))
    assert {next(i for i in range(12) if torch.equal(x[i], row)) for row in seen[2]} == expected


def test_random_selection_skips_the_selection_pass_and_draws_from_torch_rng():
    x, y = batch(n=16)
    subsets = []
    for seed in (0, 0, 1):
        model, seen = TinyConvNet(), []
        torch.manual_seed(seed)
        ESAM(model, rho=0.1, beta=1.0, gamma=0.25, selection="random").step(loss_fn_for(model, seen), (x, y))
        assert [s.shape[0] for s in seen] == [16, 4]  # no no-grad forward
        subsets.append({next(i for i in range(16) if torch.equal(x[i], row)) for row in seen[1]})
    assert subsets[0] == subsets[1] != subsets[2]


# --------------------------------------------------------------------------- #
# Robustness: models, batches and training set-ups the step must survive
# --------------------------------------------------------------------------- #
def test_a_trainable_tensor_unused_in_the_forward_stays_unperturbed():
    model = TinyConvNet()
    model.unused = torch.nn.Parameter(torch.ones(3))  # e.g. a branch this batch does not take
    params = {"unused": model.unused, "used": model.head.weight}
    seen = []

    def loss_fn(b):
        seen.append({k: p.detach().clone() for k, p in params.items()})
        return loss_fn_for(model)(b)

    ESAM(model, rho=0.5, beta=1.0, gamma=1.0).step(loss_fn, batch())
    clean, perturbed = seen
    assert torch.equal(perturbed["unused"], clean["unused"])
    assert not torch.equal(perturbed["used"], clean["used"])
    assert model.unused.grad is None and model.head.weight.grad is not None


def test_trainable_set_follows_requires_grad_changed_after_construction():
    model = TinyConvNet()
    model.head.weight.requires_grad_(False)  # frozen before ESAM is built, unfrozen later
    esam = ESAM(model, rho=0.5, beta=1.0, gamma=1.0)
    model.head.weight.requires_grad_(True)
    model.body[0].weight.requires_grad_(False)  # a callback freezing a layer mid-training
    params = {"head": model.head.weight, "conv": model.body[0].weight}
    seen = []

    def loss_fn(b):
        seen.append({k: p.detach().clone() for k, p in params.items()})
        return loss_fn_for(model)(b)

    esam.step(loss_fn, batch())
    clean, perturbed = seen
    assert not torch.equal(perturbed["head"], clean["head"])  # unfrozen: perturbed
    assert torch.equal(perturbed["conv"], clean["conv"])  # frozen: left alone
    assert model.body[0].weight.grad is None and model.head.weight.grad is not None


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    names: list


@pytest.mark.parametrize("kind", ["dict_with_list", "tuple_with_list", "namedtuple", "dataclass"])
def test_sds_subsets_every_per_example_part_of_a_batch(kind):
    x, y = batch(n=12)
    names = [f"example-{i}" for i in range(12)]
    make = {
        "dict_with_list": lambda: {"x": x, "y": y, "names": names},
        "tuple_with_list": lambda: (x, y, names),
        "namedtuple": lambda: Pair(x, y),
        "dataclass": lambda: Batch(x, y, names),
    }[kind]
    parts = {
        "dict_with_list": lambda b: (b["x"], b["y"], b["names"]),
        "tuple_with_list": lambda b: b,
        "namedtuple": lambda b: (b.x, b.y, None),
        "dataclass": lambda b: (b.x, b.y, b.names),
    }[kind]
    model = TinyConvNet()
    seen = []

    def loss_fn(b):
        bx, by, bnames = parts(b)
        assert type(b) is type(make())
        seen.append((bx, by, bnames))
        losses = F.cross_entropy(model(bx).logits, by, reduction="none")
        return losses.mean(), losses.detach()

    ESAM(model, rho=0.5, beta=1.0, gamma=0.5).step(loss_fn, make())
    sx, sy, snames = seen[-1]
    rows = [next(i for i in range(12) if torch.equal(x[i], r)) for r in sx]
    assert len(rows) == 6 and torch.equal(sy, y[rows])
    if snames is not None:
        assert snames == [names[i] for i in rows]


def test_logged_ascent_norm_is_unscaled_by_the_fp16_loss_scale():
    x, y = batch()
    norms = {}
    for name, scaler in (("plain", None), ("scaled", torch.amp.GradScaler("cpu", init_scale=1024.0))):
        model = TinyConvNet()
        esam = ESAM(model, rho=0.05, beta=1.0, gamma=1.0)
        esam.step(loss_fn_for(model), (x, y), grad_scaler=scaler,
                  backward=(lambda l: scaler.scale(l).backward()) if scaler else None)
        norms[name] = esam.pop_stats()["esam/ascent_grad_norm"]
    ref = TinyConvNet()
    grads = torch.autograd.grad(F.cross_entropy(ref(x).logits, y), list(ref.parameters()))
    expected = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    assert math.isclose(norms["plain"], expected, rel_tol=1e-5)
    assert math.isclose(norms["scaled"], expected, rel_tol=1e-5)


class CheckpointedNet(TinyConvNet):
    def __init__(self, use_reentrant):
        super().__init__(batchnorm=False)
        self.use_reentrant = use_reentrant

    def forward(self, pixel_values, labels=None):
        from torch.utils.checkpoint import checkpoint

        # The first layer stays outside, so the checkpointed part's input requires grad (as
        # transformers arranges with enable_input_require_grads).
        features = checkpoint(self.body[1:], self.body[0](pixel_values), use_reentrant=self.use_reentrant)
        return ImageClassifierOutput(logits=self.head(features))


def test_reentrant_activation_checkpointing_gets_a_clear_error_and_non_reentrant_matches_plain():
    x, y = batch()
    model = CheckpointedNet(use_reentrant=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        ESAM(model, rho=0.1, beta=1.0, gamma=1.0).step(loss_fn_for(model), (x, y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    checkpointed, plain = CheckpointedNet(use_reentrant=False), TinyConvNet(batchnorm=False)
    for m in (checkpointed, plain):
        ESAM(m, rho=0.1, beta=1.0, gamma=0.5).step(loss_fn_for(m), (x, y))
    for a, b in zip(checkpointed.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_sparse_embedding_gradients_match_a_hand_written_sam_step():
    torch.manual_seed(0)
    ids, y = torch.randint(0, 20, (8, 5)), torch.randint(0, 3, (8,))

    def build():
        torch.manual_seed(1)
        return torch.nn.ModuleDict({"emb": torch.nn.Embedding(20, 6, sparse=True), "head": torch.nn.Linear(6, 3)})

    def forward(m, ids):
        return m["head"](m["emb"](ids).mean(1))

    model = build()

    def loss_fn(b):
        losses = F.cross_entropy(forward(model, b[0]), b[1], reduction="none")
        return losses.mean(), losses.detach()

    ESAM(model, rho=0.2, beta=1.0, gamma=1.0).step(loss_fn, (ids, y))
    assert model["emb"].weight.grad.is_sparse

    ref = build()
    params = list(ref.parameters())
    grads = [g.to_dense() for g in torch.autograd.grad(F.cross_entropy(forward(ref, ids), y), params)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(0.2 * g / norm)
    F.cross_entropy(forward(ref, ids), y).backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.to_dense(), r.grad.to_dense())


def test_swp_perturbs_at_least_one_tensor_every_step_drawn_fairly():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))  # 3 trainable tensors
    esam = ESAM(model, rho=0.1, beta=0.2, gamma=1.0, seed=0)
    draws = [[id(p) for p in esam._draw_kept(esam.params)] for _ in range(3000)]
    assert min(len(d) for d in draws) == 1
    # P(kept) = beta + (1 - beta)^3 / 3 for each tensor; equal for all three.
    expected = 0.2 + 0.8 ** 3 / 3
    for p in esam.params:
        share = sum(id(p) in d for d in draws) / len(draws)
        assert abs(share - expected) < 0.03, (share, expected)
    # Logged: the fraction actually perturbed, over every step.
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def loss_fn(b):
        losses = F.cross_entropy(model(b[0]), b[1], reduction="none")
        return losses.mean(), losses.detach()

    esam = ESAM(model, rho=0.1, beta=0.2, gamma=1.0, seed=1)
    reference = ESAM(model, rho=0.1, beta=0.2, gamma=1.0, seed=1)
    perturbed = [len(reference._draw_kept(reference.params)) / 3 for _ in range(50)]
    for _ in range(50):
        esam.step(loss_fn, (x, y))
    assert esam.pop_stats()["esam/swp_kept_fraction"] == pytest.approx(sum(perturbed) / 50)


def test_balanced_selection_keeps_the_sharpest_share_of_every_class():
    from esam_hf.esam import _rank_within_groups

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 4, (24,), generator=g)
        score = torch.randn(24, generator=g)
        k = 12
        chosen = set(_rank_within_groups(score, labels).topk(k).indices.tolist())
        # Reference: rank within each class by score, as a fraction of the class; the k lowest fractions
        # (sharper first on ties).
        keys = []
        for i in range(24):
            mates = [j for j in range(24) if labels[j] == labels[i]]
            ahead = sum(score[j] > score[i] for j in mates)
            keys.append(((ahead + 0.5) / len(mates), -float(score[i]), i))
        assert chosen == {i for _, _, i in sorted(keys)[:k]}
        for c in labels.unique():  # about half of every class: never more than one example off
            n = int((labels == c).sum())
            assert abs(sum(int(labels[i]) == int(c) for i in chosen) - n / 2) <= 1


def test_balanced_selection_needs_groups_and_says_so():
    model = TinyConvNet()
    esam = ESAM(model, rho=0.1, beta=1.0, gamma=0.5, selection="balanced")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"selection 'balanced' .* pass groups= an integer tensor of shape \[16\]"):
        esam.step(loss_fn_for(model), batch())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    x, y = batch()
    esam.step(loss_fn_for(model), (x, y), groups=y)
    kept, total = torch.bincount(y[esam.last_selection], minlength=4), torch.bincount(y, minlength=4)
    assert int(kept.sum()) == 8 and all(abs(int(a) - int(n) / 2) <= 1 for a, n in zip(kept, total))


@pytest.mark.parametrize("shared", ["class_weights", "temperature"])
def test_sds_selects_per_example_parts_and_passes_shared_tensors_unchanged(shared):
    x, y = batch(n=12)
    extra = torch.tensor([1.0, 2.0, 3.0]) if shared == "class_weights" else torch.tensor(0.5)
    model = TinyConvNet()
    seen = []

    def loss_fn(b):
        bx, by, bextra = b
        seen.append((bx, by, bextra))
        losses = F.cross_entropy(model(bx).logits, by, reduction="none")
        return losses.mean(), losses.detach()

    esam = ESAM(model, rho=0.5, beta=1.0, gamma=0.5)
    esam.step(loss_fn, (x, y, extra))
    sx, sy, sextra = seen[-1]
    rows = esam.last_selection.tolist()
    assert len(sx) == 6 and torch.equal(sx, x[rows]) and torch.equal(sy, y[rows]) and sextra is extra


def test_sds_picks_per_example_items_and_refuses_an_ambiguous_part():
    from esam_hf.esam import index_batch

    x = torch.arange(6.0).view(3, 2)
    boxes = [torch.zeros(1, 4), torch.ones(5, 4), torch.full((2, 4), 2.0)]  # per image, varying counts
    picked = index_batch({"pixel_values": x, "boxes": boxes}, torch.tensor([2, 0]), 3)
    assert torch.equal(picked["pixel_values"], x[[2, 0]]) and [b.shape[0] for b in picked["boxes"]] == [2, 1]
    # A (dict, list) batch at B = 2 keeps its inputs.
    inputs, targets = {"pixel_values": x[:2]}, [torch.zeros(3), torch.ones(1)]
    sub = index_batch((inputs, targets), torch.tensor([1]), 2)
    assert torch.equal(sub[0]["pixel_values"], x[1:2]) and len(sub[1]) == 1 and torch.equal(sub[1][0], torch.ones(1))
    # Two boxes per image at batch size 2: items or rows? Refused, naming the part.
    with pytest.raises(ValueError, match=r"batch\['boxes'\]: a list of 2 tensors with 2 rows each"):
        index_batch({"pixel_values": x[:2], "boxes": [torch.zeros(2, 4), torch.ones(2, 4)]}, torch.tensor([1]), 2)
    # A top-level list of plain per-example items.
    assert index_batch(["a", "b", "c"], torch.tensor([2, 1]), 3) == ["c", "b"]


def test_an_ascent_that_reaches_no_perturbed_tensor_is_an_error_not_a_plain_step():
    model, other = TinyConvNet(), TinyConvNet(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no gradient for any perturbed tensor"):  # the wrong model given
        ESAM(model, rho=0.1, beta=1.0, gamma=0.5).step(loss_fn_for(other), batch())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    esam = ESAM(model, rho=0.1, beta=0.6, gamma=0.5)
    with pytest.raises(RuntimeError, match="no gradient for any perturbed tensor"):  # every step: a mistake
        for _ in range(3):
            esam.step(loss_fn_for(other), batch())


def test_sharded_parameters_other_than_fully_shard_are_refused():
    class DTensor(torch.nn.Parameter):  # stands in for torch.distributed.tensor.DTensor, sharded by hand
        pass

    model = torch.nn.Linear(3, 2)
    model.weight = DTensor(model.weight.detach())
    with pytest.raises(NotImplementedError, match=r"FSDP2's \(fully_shard\) on one 1-D device mesh"):
        ESAM(model)  # (fully_shard itself: tests/test_fsdp.py)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_gamma_warm_up_runs_from_the_whole_batch_to_gamma(schedule):
    from esam_hf.esam import scheduled_gamma

    gamma, warmup = 0.3, 0.4  # gamma != 1 - gamma, so a swapped end point cannot pass
    assert scheduled_gamma(gamma, 0.0, warmup, schedule) == 1.0
    assert scheduled_gamma(gamma, warmup, warmup, schedule) == gamma
    assert scheduled_gamma(gamma, 0.9, warmup, schedule) == gamma
    assert scheduled_gamma(gamma, warmup / 2, warmup, schedule) == pytest.approx(1 - (1 - gamma) / 2)  # both: halfway
    quarter = 0.25 if schedule == "linear" else (1 - math.cos(math.pi / 4)) / 2
    assert scheduled_gamma(gamma, warmup / 4, warmup, schedule) == pytest.approx(1 - (1 - gamma) * quarter)


def test_clean_loss_selection_keeps_the_largest_losses_at_w_without_a_selection_pass():
    model = TinyConvNet()
    x, y = batch()
    with torch.no_grad():  # independent reference: the per-example losses at w, before any step
        reference = F.cross_entropy(model(x).logits, y, reduction="none")
    seen = []
    esam = ESAM(model, rho=0.1, beta=1.0, gamma=0.5, selection="clean_loss")
    esam.step(loss_fn_for(model, seen), (x, y))
    assert len(seen) == 2  # ascent and descent only
    assert set(esam.last_selection.tolist()) == set(reference.topk(8).indices.tolist())


def test_ascent_selection_perturbs_from_a_random_subset_and_descends_on_the_whole_batch():
    """selection "ascent" against a hand-written step (float64): the ascent gradient of the mean loss over k random
    rows (SWP-kept tensors only, e = rho/beta g/||g||), then the descent gradient of the whole batch's mean at w + e."""
    x, y = batch(n=16)
    x = x.double()
    model, ref = TinyConvNet().double(), TinyConvNet().double()
    params, ref_params = list(model.parameters()), list(ref.parameters())
    rho, beta, seed = 0.2, 0.5, 11
    keep = swp_mask(seed, len(params), beta)
    seen = []
    torch.manual_seed(0)
    esam = ESAM(model, rho=rho, beta=beta, gamma=0.25, selection="ascent", seed=seed)
    esam.step(loss_fn_for(model, seen), (x, y))
    assert [s.shape[0] for s in seen] == [4, 16]  # ascent on k = 4 rows, no selection pass, descent on all 16
    rows = sorted(next(i for i in range(16) if torch.equal(x[i], row)) for row in seen[0])
    assert len(set(rows)) == 4 and sorted(esam.last_selection.tolist()) == rows

    ref.train()
    kept = [p for p, k in zip(ref_params, keep) if k]
    grads = torch.autograd.grad(F.cross_entropy(ref(x[rows]).logits, y[rows]), kept)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(kept, grads):
            p.add_(rho / beta * g / norm)
        # BatchNorm statistics move only in the pass at w (bn_stats "clean"): the descent must not update them.
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = False
    F.cross_entropy(ref(x).logits, y).backward()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_ascent_selection_draws_every_row_alike_and_from_torch_rng():
    x, y = batch(n=8)
    model = TinyConvNet()
    esam = ESAM(model, rho=0.1, beta=1.0, gamma=0.5, selection="ascent")
    torch.manual_seed(0)
    counts = torch.zeros(8)
    draws = []
    for _ in range(400):
        esam.step(loss_fn_for(model), (x, y))
        model.zero_grad()
        draws.append(esam.last_selection.clone())
        counts[esam.last_selection] += 1
    # 400 draws of 4 of 8 rows: each row about 200 times (binomial sd 10).
    assert counts.min() > 160 and counts.max() < 240, counts
    assert all(len(set(d.tolist())) == 4 for d in draws)
    torch.manual_seed(0)
    esam.step(loss_fn_for(model), (x, y))
    assert torch.equal(esam.last_selection, draws[0])  # the draw follows torch's seed


def authors_esam_step(model, optimizer, x, y, rho, beta, gamma, keep):
    """The authors' ESAM step, transcribed in float64 (SWP: a gradient for the kept tensors only, e = rho/beta
    g/||g|| over them; the instance sharpness l_i(w + e) - l_i(w) from a no-grad pass; the descent on the
    sharpest examples at w + e; BatchNorm statistics updated in every pass; e subtracted to restore), with the
    documented deviations only: k = ceil(gamma B) rows by topk (theirs keeps the strictly-greater ones, k - 1)
    and eps 1e-12 (theirs 1e-7)."""
    params = list(model.parameters())
    kept = [p for p, k in zip(params, keep) if k]
    losses = F.cross_entropy(model(x).logits, y, reduction="none")
    grads = torch.autograd.grad(losses.mean(), kept)
    norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
    scale = rho / (norm + 1e-12) / beta
    with torch.no_grad():
        e = [g * scale for g in grads]
        for p, d in zip(kept, e):
            p.add_(d)
        sharpness = F.cross_entropy(model(x).logits, y, reduction="none") - losses.detach()
    index = sharpness.topk(math.ceil(gamma * len(y))).indices
    F.cross_entropy(model(x[index]).logits, y[index]).backward()
    with torch.no_grad():
        for p, d in zip(kept, e):
            p.sub_(d)
    optimizer.step()
    optimizer.zero_grad()


def test_the_papers_esam_matches_the_authors_step_in_float64():
    """ESAM(selection="sharpness", bn_stats="all") over three SGD-momentum steps against the transcription of
    the authors' step, on the same SWP draws: the paper's ESAM stays available and exact."""
    rho, beta, gamma, seed = 0.1, 0.6, 0.5, 5
    model, ref = TinyConvNet().double(), TinyConvNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    esam = ESAM(model, rho=rho, beta=beta, gamma=gamma, bn_stats="all", seed=seed)
    draws = torch.Generator().manual_seed(seed)  # the documented SWP draw, replayed step by step
    n = len(list(model.parameters()))
    for step in range(3):
        x, y = batch(n=16, seed=step)
        x = x.double()
        keep = (torch.rand(n, generator=draws) < beta).tolist()
        assert any(keep)
        esam.step(loss_fn_for(model), (x, y))
        opt.step()
        opt.zero_grad()
        authors_esam_step(ref, ref_opt, x, y, rho, beta, gamma, keep)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
