"""Tests for esam_hf.landscape, each checked against an independent reference
(analytic quadratics, a dense autograd Hessian, direct loss evaluations)."""

import importlib.util
import json
import pathlib
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    from esam_hf import landscape as L
except ImportError:
    # The package __init__ imports sibling modules that may not exist yet;
    # load this module straight from its file (it only depends on torch).
    _path = pathlib.Path(__file__).resolve().parents[1] / "esam_hf" / "landscape.py"
    _spec = importlib.util.spec_from_file_location("esam_hf_landscape_standalone", _path)
    L = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(L)


# --------------------------------------------------------------------------- #
# Fixtures / reference models
# --------------------------------------------------------------------------- #
def _sym_matrix(eigenvalues, seed=0):
    """A = Q diag(eigenvalues) Q^T with a random orthogonal Q: spectrum known exactly."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


class Quadratic(nn.Module):
    """loss(w) = 0.5 * w^T A w, so the Hessian is exactly A."""

    def __init__(self, a, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.randn(a.shape[0], generator=g, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.w @ self.a @ self.w


def _quad_loss(model):
    return model()


def _analytic_quad(a, w, *terms):
    """0.5 x^T A x with x = w + sum(c * d) for (c, d) in terms, in float64."""
    x = w.clone()
    for c, d in terms:
        x = x + c * d
    return 0.5 * (x @ a @ x).item()


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def _image_batches(sizes=(6, 3), classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(n, 3, 4, 4, generator=g), "labels": torch.randint(0, classes, (n,), generator=g)}
        for n in sizes
    ]


# --------------------------------------------------------------------------- #
# Top Hessian eigenvalue
# --------------------------------------------------------------------------- #
def test_top_eigenvalue_quadratic_matches_known_spectrum():
    a = _sym_matrix([10.0, 4.0, 2.0, 1.0, 0.5, -0.3, 0.1, 0.0])
    model = Quadratic(a)
    eig = L.top_hessian_eigenvalue(model, _quad_loss, iters=100, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert eig == pytest.approx(10.0, abs=1e-3)


def test_top_eigenvalue_default_settings_close():
    # With the defaults (20 iters, tol 1e-3) a well-separated top eigenvalue is still accurate.
    a = _sym_matrix([10.0, 3.0, 2.0, 1.0, 0.5])
    eig = L.top_hessian_eigenvalue(Quadratic(a), _quad_loss, generator=torch.Generator().manual_seed(0))
    assert eig == pytest.approx(10.0, rel=1e-3)


def test_top_eigenvalue_when_dominant_eigenvalue_is_negative():
    # Largest-magnitude eigenvalue is -8, but the largest eigenvalue is 3.
    a = _sym_matrix([-8.0, 3.0, 1.0, 0.5, -1.0])
    eig = L.top_hessian_eigenvalue(Quadratic(a), _quad_loss, iters=500, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert eig == pytest.approx(3.0, abs=1e-3)


def test_top_eigenvalue_tiny_mlp_matches_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    # Dense reference: Hessian of the loss as a function of the flattened parameters.
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of_flat(v):
        chunks = torch.split(v, [s.numel() for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss_of_flat, flat)
    reference = torch.linalg.eigvalsh(hessian).max().item()

    eig = L.top_hessian_eigenvalue(model, loss_fn, iters=1000, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert eig == pytest.approx(reference, rel=1e-3, abs=1e-6)


def test_top_eigenvalue_restores_training_flags_and_leaves_grads_alone():
    model = _conv_net().train()
    batches = _image_batches()
    loss_fn = L.make_loss_fn(batches, num_batches=2)
    before = [p.detach().clone() for p in model.parameters()]
    L.top_hessian_eigenvalue(model, loss_fn, iters=3, generator=torch.Generator().manual_seed(0))
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --------------------------------------------------------------------------- #
# Filter normalisation
# --------------------------------------------------------------------------- #
def test_filter_normalized_direction_norms_and_zero_bias():
    model = _conv_net()
    direction = L.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    assert len(direction) == len(params)
    for p, d in zip(params, direction):
        assert d.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0
        else:
            for w_filter, d_filter in zip(p.detach(), d):
                torch.testing.assert_close(d_filter.norm(), w_filter.norm(), rtol=1e-5, atol=0)
            # and it is genuinely random, not just the weights themselves
            assert not torch.allclose(d, p.detach())


def test_filter_normalized_direction_is_deterministic():
    model = _conv_net()
    d_a = L.filter_normalized_direction(model, torch.Generator().manual_seed(123))
    d_b = L.filter_normalized_direction(model, torch.Generator().manual_seed(123))
    d_c = L.filter_normalized_direction(model, torch.Generator().manual_seed(124))
    assert all(torch.equal(a, b) for a, b in zip(d_a, d_b))
    assert not all(torch.equal(a, c) for a, c in zip(d_a, d_c) if a.dim() > 1)


# --------------------------------------------------------------------------- #
# Landscapes
# --------------------------------------------------------------------------- #
def test_landscape_1d_origin_and_bit_exact_restore():
    model = _conv_net().train()
    batches = _image_batches()
    loss_fn = L.make_loss_fn(batches, num_batches=2)

    # Independent reference: the loss at the unperturbed weights in eval mode.
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["pixel_values"]) for b in batches])
        reference = F.cross_entropy(logits, torch.cat([b["labels"] for b in batches])).item()
    model.train()

    before = [p.detach().clone() for p in model.parameters()]
    buffers_before = [b.clone() for b in model.buffers()]
    direction = L.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    alphas = [-1.0, -0.37, 0.0, 0.61, 1.0]
    losses = L.loss_landscape_1d(model, loss_fn, direction, alphas)

    assert losses.shape == (5,)
    assert losses[2].item() == pytest.approx(reference, rel=1e-6)
    assert not torch.allclose(losses[0], losses[2])  # the direction actually moved the weights
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(torch.equal(b, a) for b, a in zip(buffers_before, model.buffers()))  # BN stats untouched
    assert model.training and all(m.training for m in model.modules())


def test_landscape_restores_weights_when_loss_fn_raises():
    model = _conv_net()
    before = [p.detach().clone() for p in model.parameters()]
    direction = L.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    calls = []

    def flaky_loss(m):
        calls.append(1)
        if len(calls) == 2:  # raise while the weights are perturbed
            raise RuntimeError("boom")
        return m(torch.ones(1, 3, 4, 4)).sum()

    with pytest.raises(RuntimeError, match="boom"):
        L.loss_landscape_1d(model, flaky_loss, direction, [0.5, 0.7, 0.9])
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="boom"):
        calls.clear()
        L.loss_landscape_2d(model, flaky_loss, direction, direction, [0.5], [0.3, 0.4])
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_landscape_1d_quadratic_matches_analytic():
    a = _sym_matrix([5.0, 2.0, 1.0, 0.5, 0.1, -0.2])
    model = Quadratic(a)
    w = model.w.detach().clone()
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    alphas = torch.linspace(-2.0, 2.0, 9)
    losses = L.loss_landscape_1d(model, _quad_loss, [d], alphas)
    expected = torch.tensor([_analytic_quad(a, w, (al, d)) for al in alphas.tolist()], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(model.w.detach(), w)


def test_landscape_2d_quadratic_matches_analytic_and_orientation():
    a = _sym_matrix([3.0, 1.0, 0.5, 0.2])
    model = Quadratic(a)
    w = model.w.detach().clone()
    g = torch.Generator().manual_seed(3)
    d1 = torch.randn(w.shape, generator=g, dtype=torch.float64)
    d2 = torch.randn(w.shape, generator=g, dtype=torch.float64)
    alphas, betas = [-1.0, 0.0, 0.5], [-0.5, 0.25]  # unequal lengths catch a transposed grid
    losses = L.loss_landscape_2d(model, _quad_loss, [d1], [d2], alphas, betas)
    assert losses.shape == (3, 2)
    for i, al in enumerate(alphas):
        for j, be in enumerate(betas):
            assert losses[i, j].item() == pytest.approx(_analytic_quad(a, w, (al, d1), (be, d2)), rel=1e-10)
    assert torch.equal(model.w.detach(), w)


# --------------------------------------------------------------------------- #
# make_loss_fn
# --------------------------------------------------------------------------- #
class _HFStyle(nn.Module):
    """Mimics an HF image classifier: keyword pixel_values, output with .logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values=None, labels=None):
        return types.SimpleNamespace(logits=self.inner(pixel_values))


def test_make_loss_fn_is_per_example_mean_over_first_batches():
    model = _conv_net().eval()
    batches = _image_batches(sizes=(6, 3, 5))  # third batch must be ignored
    loss_fn = L.make_loss_fn(batches, num_batches=2)
    with torch.no_grad():
        logits = torch.cat([model(b["pixel_values"]) for b in batches[:2]])
        reference = F.cross_entropy(logits, torch.cat([b["labels"] for b in batches[:2]])).item()
        assert loss_fn(model).item() == pytest.approx(reference, rel=1e-6)
        # HF-style wrapper around the same network gives the same loss.
        assert loss_fn(_HFStyle(model)).item() == pytest.approx(reference, rel=1e-6)


# --------------------------------------------------------------------------- #
# Plots and report
# --------------------------------------------------------------------------- #
def _is_png(path):
    data = pathlib.Path(path).read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    alphas = torch.linspace(-1, 1, 11)
    p1 = L.plot_landscape_1d({"sgd": (alphas, alphas**2), "esam": (alphas.tolist(), (0.5 * alphas**2).tolist())}, tmp_path / "a" / "one.png")
    betas = torch.linspace(-1, 1, 7)
    z1 = alphas[:, None] ** 2 + betas[None, :] ** 2
    p2 = L.plot_landscape_2d({"sgd": (alphas, betas, z1), "esam": (alphas, betas, 0.5 * z1)}, tmp_path / "two.png")
    assert _is_png(p1) and _is_png(p2)


def test_landscape_report(tmp_path):
    torch.manual_seed(0)
    models = {"sgd": _conv_net(), "esam": _HFStyle(_conv_net())}
    with torch.no_grad():  # make the two models differ
        for p in models["esam"].parameters():
            p.mul_(0.5)
    batches = _image_batches()
    loss_fn = L.make_loss_fn(batches, num_batches=2)
    report = L.landscape_report(
        models, loss_fn, tmp_path, seed=0, alphas_1d=[-1.0, 0.0, 1.0], alphas_2d=[-1.0, 0.0, 1.0], betas_2d=[-0.5, 0.0, 0.5], hessian_iters=3
    )

    assert _is_png(tmp_path / "landscape_1d.png") and _is_png(tmp_path / "landscape_2d.png")
    on_disk = json.loads((tmp_path / "landscape.json").read_text())
    assert on_disk["models"].keys() == {"sgd", "esam"}
    for name, model in models.items():
        entry = on_disk["models"][name]
        assert isinstance(entry["top_hessian_eigenvalue"], float)
        assert len(entry["landscape_1d"]["losses"]) == 3
        assert len(entry["landscape_2d"]["losses"]) == 3 and len(entry["landscape_2d"]["losses"][0]) == 3
        with torch.no_grad():
            model.eval()
            at_origin = loss_fn(model).item()
        assert entry["landscape_1d"]["losses"][1] == pytest.approx(at_origin, rel=1e-6)
        assert entry["landscape_2d"]["losses"][1][1] == pytest.approx(at_origin, rel=1e-6)
    assert report["models"]["sgd"]["top_hessian_eigenvalue"] == on_disk["models"]["sgd"]["top_hessian_eigenvalue"]
