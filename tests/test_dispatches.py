"""Host cost per optimizer step, counted in operator dispatches (what a host-bound GPU step waits on).

Counts come from `benchmarks/step_speed.py dispatches` (a TorchDispatchMode over whole optimizer steps of the
Trainer and of the bare core loop). The bounds are ratios between paths measured side by side, so they hold across torch
versions: the ESAM layer must add almost nothing to the Trainer's own step, and the default mode must cost
the host no more than SAM.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_speed as dispatches  # noqa: E402


@pytest.fixture(scope="module")
def counts():
    return {"trainer": {m: dispatches.count_trainer(m, steps=2) for m in ("trainer", "rho0", "sam", "default")},
            "loop": {m: dispatches.count_loop(m, steps=2) for m in ("sam", "default")}}


def test_esam_trainer_at_rho_0_costs_the_host_what_the_plain_trainer_does(counts):
    assert counts["trainer"]["rho0"] <= 1.05 * counts["trainer"]["trainer"], counts


def test_the_default_mode_costs_the_host_no_more_than_sam(counts):
    assert counts["trainer"]["default"] <= counts["trainer"]["sam"], counts
    assert counts["loop"]["default"] <= counts["loop"]["sam"], counts


@pytest.mark.parametrize("method", ["sam", "default"])
def test_the_trainer_path_is_within_10_percent_of_the_bare_loop(counts, method):
    assert counts["trainer"][method] <= 1.10 * counts["loop"][method], counts


def test_the_counter_sees_a_per_tensor_loop():
    """The counter is not blind to what it guards against: a Python loop over the parameters adds one dispatch
    per tensor."""
    import torch

    model = dispatches._model()
    params = list(model.parameters())
    with dispatches.Counter() as per_tensor:
        for p in params:
            p.detach().mul(1.0)
    with dispatches.Counter() as foreach:
        torch._foreach_mul([p.detach() for p in params], 1.0)
    assert per_tensor.count >= 2 * len(params) and foreach.count <= len(params) + 1
