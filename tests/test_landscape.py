"""Tests for esam_hf.landscape, each checked against an independent reference
(analytic quadratics, a dense autograd Hessian, direct loss evaluations)."""

import json
import pathlib
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esam_hf import landscape as L
from esam_hf.landscape import command, figures


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
def _top_eig(a, **kwargs):
    return L.top_hessian_eigenvalue(Quadratic(a), _quad_loss, generator=torch.Generator().manual_seed(0), **kwargs)


def test_top_eigenvalue_quadratic_matches_known_spectrum():
    a = _sym_matrix([10.0, 4.0, 2.0, 1.0, 0.5, -0.3, 0.1, 0.0])
    eig = _top_eig(a, max_iters=100, tol=1e-8)
    assert eig.converged and float(eig) == pytest.approx(10.0, abs=1e-3)


def test_top_eigenvalue_default_settings_close():
    # With the defaults (tol 1e-3, at most 100 iterations) a well-separated top eigenvalue is accurate.
    a = _sym_matrix([10.0, 3.0, 2.0, 1.0, 0.5])
    eig = _top_eig(a)
    assert eig.converged and eig.value == pytest.approx(10.0, rel=1e-3)


def test_top_eigenvalue_small_gap_runs_past_20_iterations_to_the_tolerance():
    # lambda_2 / lambda_1 = 0.9: the error shrinks by only (0.9)^2 per step; the old fixed 20 were not enough.
    a = _sym_matrix([10.0, 9.0, 3.0, 1.0, 0.5])
    reference = torch.linalg.eigvalsh(a).max().item()
    eig = _top_eig(a, max_iters=1000, tol=1e-6)
    assert eig.converged and eig.iterations > 20
    assert eig.value == pytest.approx(reference, rel=1e-4)


def test_top_eigenvalue_reports_not_converged_when_max_iters_runs_out():
    a = _sym_matrix([10.0, 9.0, 3.0, 1.0, 0.5])
    reference = torch.linalg.eigvalsh(a).max().item()
    eig = _top_eig(a, max_iters=20, tol=1e-6)
    assert (eig.converged, eig.iterations) == (False, 20)
    assert abs(eig.value - reference) > 1e-3 * reference  # the flag is right: the value is still off


def test_top_eigenvalue_when_dominant_eigenvalue_is_negative():
    # Largest-magnitude eigenvalue is -8, but the largest eigenvalue is 3.
    a = _sym_matrix([-8.0, 3.0, 1.0, 0.5, -1.0])
    eig = _top_eig(a, max_iters=500, tol=1e-10)
    assert eig.converged and eig.value == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize("kwargs, message", [({"max_iters": 0}, "max_iters must be >= 1"), ({"tol": 0.0}, "tol must be > 0")])
def test_top_eigenvalue_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _top_eig(_sym_matrix([2.0, 1.0]), **kwargs)


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

    eig = L.top_hessian_eigenvalue(model, loss_fn, max_iters=1000, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert eig.converged and eig.value == pytest.approx(reference, rel=1e-3, abs=1e-6)


def test_top_eigenvalue_restores_training_flags_and_leaves_grads_alone():
    model = _conv_net().train()
    batches = _image_batches()
    loss_fn = L.make_loss_fn(batches, num_batches=2)
    before = [p.detach().clone() for p in model.parameters()]
    L.top_hessian_eigenvalue(model, loss_fn, max_iters=3, generator=torch.Generator().manual_seed(0))
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
    alphas_1, alphas_2 = [-1.0, 0.0, 0.5], [-0.5, 0.25]  # unequal lengths catch a transposed grid
    losses = L.loss_landscape_2d(model, _quad_loss, [d1], [d2], alphas_1, alphas_2)
    assert losses.shape == (3, 2)
    for i, a1 in enumerate(alphas_1):
        for j, a2 in enumerate(alphas_2):
            assert losses[i, j].item() == pytest.approx(_analytic_quad(a, w, (a1, d1), (a2, d2)), rel=1e-10)
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


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures the plot functions save, for checking what they show."""
    saved, save = [], figures._save

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return saved


def _texts(fig):
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text)]


def test_plot_1d_log_panel_zoom_panel_and_eigenvalues_in_legend(tmp_path, saved_figures):
    alphas = torch.linspace(-1, 1, 21)
    sharp, flat = 1.0 + 1000 * alphas**4, 1.2 + 50 * alphas**4  # SGD-like edges 1000x the minimum
    eigenvalues = {"sgd": L.TopEigenvalue(33.27, 9, True), "esam": L.TopEigenvalue(18.4, 100, False)}
    path = L.plot_landscape_1d({"sgd": (alphas, sharp), "esam": (alphas, flat)}, tmp_path / "a" / "one.png", eigenvalues)
    assert _is_png(path)
    (fig,) = saved_figures
    full, zoom = fig.axes
    assert full.get_yscale() == "log"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "33.27" in legend[0] and "18.4" in legend[1] and "not converged" in legend[1]
    # Zoom: up to 2x the highest loss at alpha = 0 (1.2), over the alphas where some model is below it.
    assert zoom.get_ylim()[1] == pytest.approx(2.4)
    inside = alphas[(flat <= 2.4) | (sharp <= 2.4)]
    assert zoom.get_xlim()[0] <= inside.min().item() and zoom.get_xlim()[1] >= inside.max().item()
    assert zoom.get_xlim()[1] - zoom.get_xlim()[0] < 1.0  # narrower than the whole [-1, 1]
    assert {ax.get_xlabel() for ax in fig.axes} == {"direction 1 (alpha)"}


def test_plot_2d_log_spaced_levels_and_neutral_axis_names(tmp_path, saved_figures):
    alphas_1, alphas_2 = torch.linspace(-1, 1, 11), torch.linspace(-1, 1, 7)
    z = 1.0 + 1000 * (alphas_1[:, None] ** 4 + alphas_2[None, :] ** 4)
    path = L.plot_landscape_2d({"sgd": (alphas_1, alphas_2, z), "esam": (alphas_1, alphas_2, 0.5 * z)}, tmp_path / "two.png")
    assert _is_png(path)
    (fig,) = saved_figures
    contour = next(c for c in fig.axes[0].collections if getattr(c, "filled", False))
    levels = torch.as_tensor(contour.levels, dtype=torch.float64)
    # Shared, log-spaced levels from the lowest loss of all panels (0.5) to the highest (2001).
    assert levels[0].item() == pytest.approx(0.5) and levels[-1].item() == pytest.approx(2001.0)
    ratios = levels[1:] / levels[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))
    assert fig.axes[0].get_xlabel() == "direction 1 (alpha)" and fig.axes[0].get_ylabel() == "direction 2"
    assert not [t for t in _texts(fig) if any(word in t.lower() for word in ("beta", "gamma", "rho"))]


class ColumnQuadratic(Quadratic):
    """0.5 w^T A w with w a column (n, 1): a 2-D weight, so filter normalisation gives it a direction."""

    def __init__(self, a, seed=1):
        super().__init__(a, seed)
        self.w = nn.Parameter(self.w.detach()[:, None])

    def forward(self):
        return 0.5 * (self.w.T @ self.a @ self.w).squeeze()


def test_landscape_report(tmp_path):
    torch.manual_seed(0)
    models = {"sgd": _conv_net(), "esam": _HFStyle(_conv_net())}
    with torch.no_grad():  # make the two models differ
        for p in models["esam"].parameters():
            p.mul_(0.5)
    batches = _image_batches()
    loss_fn = L.make_loss_fn(batches, num_batches=2)
    report = L.landscape_report(
        models, loss_fn, tmp_path, seed=0, alphas_1d=[-1.0, 0.0, 1.0], alphas_2d=[-1.0, 0.0, 1.0], hessian_max_iters=3
    )

    assert _is_png(tmp_path / "landscape_1d.png") and _is_png(tmp_path / "landscape_2d.png")
    on_disk = json.loads((tmp_path / "landscape.json").read_text())
    assert on_disk["models"].keys() == {"sgd", "esam"}
    # the files by name within the folder: no local path is published with the report
    assert on_disk["files"] == {"landscape_1d": "landscape_1d.png", "landscape_2d": "landscape_2d.png", "json": "landscape.json"}
    assert (on_disk["hessian_max_iters"], on_disk["hessian_tol"]) == (3, 1e-3)
    for name, model in models.items():
        entry = on_disk["models"][name]
        assert isinstance(entry["top_hessian_eigenvalue"], float)
        # max_iters caps each run; a negative dominant eigenvalue takes a second, shifted run.
        assert isinstance(entry["hessian_converged"], bool) and 2 <= entry["hessian_iterations"] <= 2 * 3
        assert entry["landscape_2d"]["alphas_1"] == entry["landscape_2d"]["alphas_2"] == [-1.0, 0.0, 1.0]
        assert len(entry["landscape_1d"]["losses"]) == 3
        assert len(entry["landscape_2d"]["losses"]) == 3 and len(entry["landscape_2d"]["losses"][0]) == 3
        with torch.no_grad():
            model.eval()
            at_origin = loss_fn(model).item()
        assert entry["landscape_1d"]["losses"][1] == pytest.approx(at_origin, rel=1e-6)
        assert entry["landscape_2d"]["losses"][1][1] == pytest.approx(at_origin, rel=1e-6)
    assert report["models"]["sgd"]["top_hessian_eigenvalue"] == on_disk["models"]["sgd"]["top_hessian_eigenvalue"]


def test_landscape_report_eigenvalues_and_convergence_against_known_spectra(tmp_path):
    spectra = {"sharp": [12.0, 3.0, 1.0, 0.5], "flat": [2.0, 0.5, 0.25, 0.1]}
    models = {name: ColumnQuadratic(_sym_matrix(spectrum)) for name, spectrum in spectra.items()}
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    report = L.landscape_report(models, _quad_loss, tmp_path, alphas_1d=alphas, hessian_tol=1e-8, with_2d=False)
    capped = L.landscape_report(models, _quad_loss, tmp_path / "capped", alphas_1d=alphas, hessian_max_iters=2,
                                hessian_tol=1e-8, with_2d=False)
    for name, spectrum in spectra.items():
        entry, capped_entry = report["models"][name], capped["models"][name]
        assert entry["top_hessian_eigenvalue"] == pytest.approx(max(spectrum), rel=1e-6)
        assert entry["hessian_converged"] and 2 < entry["hessian_iterations"] < 100
        assert (capped_entry["hessian_converged"], capped_entry["hessian_iterations"]) == (False, 2)
        w = models[name].w.detach().flatten()
        assert entry["landscape_1d"]["losses"][2] == pytest.approx(_analytic_quad(models[name].a, w), rel=1e-12)
    assert not (tmp_path / "landscape_2d.png").exists()


def test_progress_bars_label_grid_points_and_power_iterations(capsys):
    a = _sym_matrix([3.0, 1.0])
    model = Quadratic(a)
    direction = [torch.ones(2, dtype=torch.float64)]
    L.loss_landscape_1d(model, _quad_loss, direction, [-1.0, 0.0, 1.0], progress="quad: 1-D")
    L.top_hessian_eigenvalue(model, _quad_loss, max_iters=50, tol=1e-6, progress="quad: Hessian")
    err = capsys.readouterr().err
    assert "quad: 1-D" in err and "/3 " in err
    assert "quad: Hessian" in err and "/50" in err
    L.loss_landscape_1d(model, _quad_loss, direction, [-1.0, 0.0, 1.0])  # no label: no bar
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- #
# `esam-hf landscape` (main)
# --------------------------------------------------------------------------- #
def _model_folder(path):
    path.mkdir()
    (path / "config.json").write_text("{}")  # enough for the option checks, which run before loading
    return str(path)


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if main gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(command, "load_model", refuse)
    monkeypatch.setattr(command, "landscape_report", refuse)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--grid", "1"], "--grid must be an odd integer >= 3"),
        (["--grid", "4"], "--grid must be an odd integer >= 3"),
        (["--samples", "0"], "--samples must be an integer >= 1, got 0"),
        (["--batch-size", "-2"], "--batch_size must be an integer >= 1, got -2"),
        (["--hessian_max_iters", "0"], "--hessian_max_iters must be an integer >= 1"),
        (["--hessian_tol", "1.5"], "--hessian_tol must be in (0, 1)"),
        (["--names", "sgd,sgd"], "--names must give one distinct name per model"),
        (["--names", "only_one"], "--names must give one distinct name per model"),
        (["--dataset", "no-such-dataset"], "--dataset: "),
    ],
)
def test_main_rejects_bad_options_before_any_work(tmp_path, capsys, no_work, extra, expected):
    models = ",".join([_model_folder(tmp_path / "sgd"), _model_folder(tmp_path / "esam")])
    argv = ["--models", models, "--dataset", "cifar10-subset", "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        L.main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_main_rejects_a_folder_without_a_saved_model(tmp_path, capsys, no_work):
    (tmp_path / "empty").mkdir()
    argv = ["--models", f"{_model_folder(tmp_path / 'sgd')},{tmp_path / 'empty'}", "--dataset", "cifar10-subset",
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        L.main(argv)
    assert f"--models: '{tmp_path / 'empty'}' is not a saved model folder (no config.json in it)" in capsys.readouterr().err


def _cifar10_subset_classes():
    from esam_hf.data import load_splits, resolve_dataset

    return load_splits(resolve_dataset("cifar10-subset", eval_split="none"), max_train_samples=1)[2]


def test_main_refuses_a_model_whose_classes_are_not_the_datas(tmp_path, capsys, no_work):
    """The same names in another order would score every image against the wrong class, silently."""
    from esam_hf.models import create_model

    classes = _cifar10_subset_classes()
    create_model("cifar_resnet18", classes, channels=[4, 4, 8, 8]).save_pretrained(tmp_path / "right")
    create_model("cifar_resnet18", classes[::-1], channels=[4, 4, 8, 8]).save_pretrained(tmp_path / "reversed")
    with pytest.raises(SystemExit) as exit_info:
        L.main(["--models", f"{tmp_path / 'right'},{tmp_path / 'reversed'}", "--dataset", "cifar10-subset",
                "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--models {tmp_path / 'reversed'}: the model's classes" in err
    assert ", ".join(repr(c) for c in classes[::-1]) in err and ", ".join(repr(c) for c in classes) in err
    assert f"--models {tmp_path / 'right'}" not in err and not (tmp_path / "out").exists()
    # Fewer classes than the data has is a mismatch too.
    create_model("cifar_resnet18", classes[:5], channels=[4, 4, 8, 8]).save_pretrained(tmp_path / "five")
    with pytest.raises(SystemExit):
        L.main(["--models", str(tmp_path / "five"), "--dataset", "cifar10-subset", "--output_dir", str(tmp_path / "out")])
    assert f"--models {tmp_path / 'five'}: the model's classes" in capsys.readouterr().err


def test_main_on_saved_models(tmp_path, capsys):
    from esam_hf.models import create_model

    for name, seed in (("sgd", 0), ("esam", 1)):
        torch.manual_seed(seed)
        create_model("cifar_resnet18", _cifar10_subset_classes(), channels=[4, 4, 8, 8]).save_pretrained(tmp_path / name)
    before = (tmp_path / "sgd" / "model.safetensors").read_bytes()
    report = L.main(["--models", f"{tmp_path / 'sgd'},{tmp_path / 'esam'}", "--dataset", "cifar10-subset",
                     "--samples", "20", "--batch_size", "10", "--grid", "3", "--hessian_max_iters", "4",
                     "--output_dir", str(tmp_path / "out")])

    on_disk = json.loads((tmp_path / "out" / "landscape.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert _is_png(tmp_path / "out" / "landscape_1d.png") and _is_png(tmp_path / "out" / "landscape_2d.png")
    assert (on_disk["hessian_max_iters"], on_disk["hessian_tol"]) == (4, 1e-3)
    printed = capsys.readouterr().out
    assert "| model | top Hessian eigenvalue | power iterations | converged | train-subset loss |" in printed
    for name, entry in on_disk["models"].items():  # names default to the folder names
        assert entry["landscape_1d"]["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]  # exactly 0 in the middle
        assert entry["landscape_2d"]["alphas_1"] == [-1.0, 0.0, 1.0]
        iterations, converged = entry["hessian_iterations"], entry["hessian_converged"]
        assert 2 <= iterations <= 4 and (converged or iterations == 4)
        row = f"| {name} | {entry['top_hessian_eigenvalue']:.4g} | {iterations} | {'yes' if converged else 'no'} |"
        assert row in printed
    assert (tmp_path / "sgd" / "model.safetensors").read_bytes() == before
