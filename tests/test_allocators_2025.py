"""ATP and DLP: the formulas on fixed numbers worked out by hand, the weighted mean, the bounds,
the grid search against a fake loss, and DLP's medians against plain full-model forwards."""

import numpy as np
import pytest
import torch

from actpat.sparsity.allocation import MAX_SPARSITY, fix_mean, owl_formula
from actpat.sparsity.allocators_2025 import (atp_grid, atp_grid_search, atp_max_beta,
                                             atp_schedule, dlp_formula, layer_median_scores)
from actpat.errors import UserError
from helpers import calib
from reference import linear_modules, out_in
from tiny import tiny_model


def weighted(values, sizes):
    return sum(v * w for v, w in zip(values, sizes)) / sum(sizes)


# --------------------------------------------------------------------------- ATP


def test_atp_schedule_by_hand():
    # equal sizes: c = S - beta (L-1)/2 = 0.5 - 0.02
    assert atp_schedule(0.5, 0.01, 5) == pytest.approx([0.48, 0.49, 0.50, 0.51, 0.52], abs=1e-15)
    # sizes 1, 1, 2: weighted mean index 5/4, c = 0.5 - 0.1 * 1.25 = 0.375
    got = atp_schedule(0.5, 0.1, 3, [1, 1, 2])
    assert got == pytest.approx([0.375, 0.475, 0.575], abs=1e-15)
    assert weighted(got, [1, 1, 2]) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.6, 0.7, 0.9])
@pytest.mark.parametrize("sizes", [None, [3, 1, 4, 1, 5, 9, 2, 6]])
def test_atp_weighted_mean_and_bounds_over_the_grid(s, sizes):
    n = 8
    grid = atp_grid(s, n, sizes)
    assert grid and grid[0] == 0.002
    assert np.allclose(np.diff(grid), 0.002)
    for beta in grid:
        sched = atp_schedule(s, beta, n, sizes)
        assert weighted(sched, sizes or [1] * n) == pytest.approx(s, abs=1e-12)
        assert min(sched) >= -1e-12 and max(sched) <= MAX_SPARSITY + 1e-12
        assert np.allclose(np.diff(sched), beta)  # an arithmetic progression, rising with depth
        # fix_mean (applied by allocate) leaves a legal schedule as it is
        assert fix_mean(sched, s, sizes) == pytest.approx(sched, abs=1e-12)
    # the next step of the walk is out of bounds
    beyond = atp_schedule(s, grid[-1] + 0.002, n, sizes)
    assert min(beyond) < 0 or max(beyond) > MAX_SPARSITY


def test_atp_bound_is_the_authors_for_equal_layers():
    # min(2S/(L-1), 2(cap-S)/(L-1)) for 30 equal layers
    assert atp_max_beta(0.5, 30) == pytest.approx(2 * (MAX_SPARSITY - 0.5) / 29, abs=1e-15)
    assert atp_max_beta(0.3, 30) == pytest.approx(2 * 0.3 / 29, abs=1e-15)
    assert len(atp_grid(0.5, 30)) == 17  # 0.002 .. 0.034 (0.0344 is the bound)
    assert len(atp_grid(0.7, 30)) == 10  # 0.002 .. 0.020 (0.0206)


def test_atp_grid_search_picks_the_lowest_calibration_loss():
    calls = []

    def fake_loss(sched):  # a bowl in the slope with its minimum at beta = 0.012
        beta = sched[1] - sched[0]
        calls.append(beta)
        return (beta - 0.012) ** 2 + 1.0

    out = atp_grid_search(0.5, fake_loss, 30)
    assert out["beta"] == pytest.approx(0.012)
    assert out["sparsities"] == pytest.approx(atp_schedule(0.5, 0.012, 30))
    assert out["loss"] == pytest.approx(1.0)
    assert [t["beta"] for t in out["trials"]] == atp_grid(0.5, 30)
    assert len(calls) == 17  # every grid point scored once


def test_atp_grid_search_ties_keep_the_smaller_beta_and_a_given_grid():
    out = atp_grid_search(0.5, lambda s: 3.0, 10, grid=[0.01, 0.02, 0.03])
    assert out["beta"] == 0.01
    out = atp_grid_search(0.5, lambda s: -(s[1] - s[0]), 10, grid=[0.01, 0.02, 0.03])
    assert out["beta"] == 0.03


def test_atp_no_legal_beta_gives_uniform():
    out = atp_grid_search(0.001, lambda s: pytest.fail("must not score"), 30)
    assert out["beta"] == 0.0 and out["sparsities"] == [0.001] * 30 and out["trials"] == []


def test_atp_bad_input():
    with pytest.raises(UserError, match="at least two layers"):
        atp_schedule(0.5, 0.01, 1)
    with pytest.raises(UserError, match="step must be > 0"):
        atp_grid(0.5, 10, step=0.0)
    with pytest.raises(UserError, match="must match"):
        atp_schedule(0.5, 0.01, 3, [1, 2])


# --------------------------------------------------------------------------- DLP


def test_dlp_formula_by_hand():
    # u = 1..4: I = 1 - u/10 = .9 .8 .7 .6; scaled to [0, 0.2]: .2 .1333 .0667 0 (mean .1)
    got = dlp_formula([1, 2, 3, 4], 0.5, alpha=0.1)
    assert got == pytest.approx([0.4, 0.5 - 0.2 / 6, 0.5 + 0.2 / 6, 0.6], abs=1e-12)
    assert np.mean(got) == pytest.approx(0.5, abs=1e-15)
    # larger median score (less important) -> more sparsity
    assert got == sorted(got)


def test_dlp_is_owl_mapping_of_relative_importance():
    u = np.array([0.7, 0.2, 1.9, 0.4, 0.4, 1.1])
    assert dlp_formula(u, 0.6, 0.15) == pytest.approx(
        owl_formula(1 - u / u.sum(), 0.6, 0.15), abs=1e-12)


def test_dlp_equal_medians_give_uniform_and_bad_input():
    assert dlp_formula([2.0, 2.0, 2.0], 0.7) == pytest.approx([0.7] * 3, abs=1e-15)
    with pytest.raises(UserError, match="at least two layers"):
        dlp_formula([1.0], 0.5)
    with pytest.raises(UserError, match="positive sum"):
        dlp_formula([0.0, 0.0], 0.5)


def test_dlp_medians_against_plain_forwards():
    """u_i from input norms gathered by one plain full-model forward (the dense sequential pass
    sees the same inputs) and a sorted-array lower median."""
    model = tiny_model("llama", seed=5)
    seqs = calib(6, 20)
    inputs = {}
    mods = linear_modules(model)
    hooks = [module.register_forward_hook(
        lambda mod, inp, out, name=name: inputs.setdefault(name, []).append(
            inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for name, (_, _, module) in mods.items()]
    with torch.no_grad():
        model(torch.tensor(seqs))
    for h in hooks:
        h.remove()
    expected = []
    for layer in range(2):
        scores = []
        for name, (i, _, module) in mods.items():
            if i == layer:
                norm = torch.cat(inputs[name]).double().norm(dim=0)
                scores.append((out_in(module).detach().double().abs() * norm).flatten().numpy())
        flat = np.sort(np.concatenate(scores))
        expected.append(flat[(flat.size - 1) // 2])
    got = layer_median_scores(model, seqs, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got[0] != got[1]


def test_atp_and_dlp_entries_on_a_tiny_model():
    from actpat.sparsity.allocation_search import MaskScorer
    from actpat.sparsity.allocators_2025 import atp_allocation, dlp_allocation

    seqs, held = calib(6, 20), calib(4, 20, seed=5)
    model = tiny_model("llama", seed=7)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    info = {}
    got = atp_allocation(0.5, model=model, calib_inputs=seqs, held_inputs=held,
                         atp_step=0.1, batch_size=3, info=info)
    trials = info["atp"]["trials"]
    assert [t["beta"] for t in trials] == atp_grid(0.5, 2, step=0.1)
    # every beta's loss is the held-apart perplexity of that schedule's masks
    with MaskScorer(model, seqs, held, [0.5, 0.5], metric="ppl", batch_size=3) as scorer:
        for t in trials:
            assert scorer(atp_schedule(0.5, t["beta"], 2)) == pytest.approx(t["loss"], rel=1e-12)
    best = min(trials, key=lambda t: t["loss"])
    assert got == pytest.approx(atp_schedule(0.5, best["beta"], 2))
    for k, v in model.state_dict().items():
        assert torch.equal(dense[k], v), k
    info = {}
    got = dlp_allocation(0.5, model=model, calib_inputs=seqs, batch_size=3, info=info)
    assert got == pytest.approx(dlp_formula(info["dlp"]["medians"], 0.5, 0.15))
    assert info["dlp"]["medians"] == pytest.approx(layer_median_scores(model, seqs, 3))
    with pytest.raises(UserError, match="held-apart"):
        atp_allocation(0.5, model=model, calib_inputs=seqs)
