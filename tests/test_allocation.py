"""Allocators: invariants (weighted mean S, each S_i in [0, 1)) and formulas on fixed inputs."""

import json
import math
import statistics

import numpy as np
import pytest
import torch

from actpat.sparsity.allocation import (ALLOCATORS, activation_formula, allocate, alphapruning_formula,
                               check_profile, fix_mean, hill_alpha, model_layer_sizes,
                               owl_formula, MAX_SPARSITY)
from actpat.cli import main
from actpat.errors import UserError
from actpat.models.loading import LoadedModel, scored_matrices
from actpat.activation.profiling import Profile
from tiny import ARCHS, VOCAB, tiny_model


def weighted(values, sizes):
    return sum(v * w for v, w in zip(values, sizes)) / sum(sizes)


def calib(n=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g).tolist()


# --------------------------------------------------------------------------- formulas


def test_activation_formula_fixed_numbers():
    counts, s, a, b = [120, 80, 100, 40, 160], 0.5, 2.0, 0.2
    mu, sd = statistics.fmean(counts), statistics.pstdev(counts)
    n_prime = [1 / (1 + math.exp(-((c - mu) / sd + a))) for c in counts]
    total = sum(n_prime)
    expected = [s + b * s * (1 - x * len(counts) / total) for x in n_prime]
    got = allocate("activation", s, counts=counts, alpha=a, beta=b)
    assert got == pytest.approx(expected, abs=1e-12)
    assert statistics.fmean(got) == pytest.approx(s, abs=1e-12)
    # few activated weights -> more sparsity (the paper's direction)
    assert got[3] == max(got) and got[4] == min(got)
    # hand-checked value for the layer with N = 40: z = -1.5, N' = sigmoid(0.5)
    assert got[3] == pytest.approx(0.5 + 0.1 * (1 - 5 / (1 + math.exp(-0.5)) / total), abs=1e-12)


def test_activation_equal_counts_is_uniform():
    assert activation_formula([7, 7, 7], 0.6) == pytest.approx([0.6] * 3)


def test_activation_unequal_layer_sizes_rescaled_to_weighted_mean():
    counts, sizes = [10, 50, 30, 20], [100, 100, 400, 200]
    raw = activation_formula(counts, 0.5)
    got = allocate("activation", 0.5, counts=counts, layer_sizes=sizes)
    assert weighted(got, sizes) == pytest.approx(0.5, abs=1e-12)
    factor = got[0] / raw[0]
    assert got == pytest.approx([x * factor for x in raw], rel=1e-12)  # one common factor


def test_owl_formula_fixed_numbers():
    ratios, s, lam = [0.010, 0.030, 0.020, 0.050], 0.6, 0.08
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    m = sum(scaled) / len(scaled)
    expected = [1 - (x - m + 1 - s) for x in scaled]
    got = owl_formula(ratios, s, lam)
    assert got == pytest.approx(expected, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam)
    assert got[0] == max(got)  # fewest outliers -> most sparsity


def test_alphapruning_formula_fixed_numbers():
    assert alphapruning_formula([2.0, 3.0, 4.0], 0.5, 0.3) == pytest.approx([0.35, 0.5, 0.65])
    got = alphapruning_formula([2.0, 3.0, 4.0], 0.5, 0.3, [1, 1, 2])
    scale = 0.5 / ((0.7 + 1.0 + 2 * 1.3) / 4)
    assert got == pytest.approx([0.7 * scale, 1.0 * scale, 1.3 * scale])


def _hill_loop(eigs):
    """Reference: plain loops over candidate xmin, KS distance, smallest wins."""
    lam = sorted(float(x) for x in eigs)
    best = (math.inf, None)
    for k in range(len(lam) - 1):
        tail = lam[k:]
        m = len(tail)
        s = sum(math.log(x / lam[k]) for x in tail)
        if s <= 0:
            continue
        a = 1 + m / s
        d = max(abs(1 - (x / lam[k]) ** (1 - a) - j / m) for j, x in enumerate(tail))
        if d < best[0]:
            best = (d, a)
    return best[1]


def test_hill_estimator_matches_loops_and_recovers_power_law():
    rng = np.random.default_rng(0)
    eigs = rng.pareto(2.0, 300) + 1.0  # density ~ x^-3 above 1
    assert hill_alpha(eigs) == pytest.approx(_hill_loop(eigs), rel=1e-9)
    big = rng.pareto(2.0, 4000) + 1.0
    assert hill_alpha(big) == pytest.approx(3.0, abs=0.25)
    small = rng.lognormal(size=50)
    assert hill_alpha(small) == pytest.approx(_hill_loop(small), rel=1e-9)


def test_fix_mean_clips_and_redistributes():
    got = fix_mean([0.5, 1.5, 0.2], 0.9, [1, 1, 1])
    assert weighted(got, [1, 1, 1]) == pytest.approx(0.9)
    assert max(got) == MAX_SPARSITY and all(0 <= x < 1 for x in got)


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("method", sorted(ALLOCATORS))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_invariants_every_allocator(method, sparsity):
    model = tiny_model("llama")
    sizes = model_layer_sizes(model)
    got = allocate(method, sparsity, model=model, calib_inputs=calib(),
                   counts=[300, 40] if method == "activation" else None, beta=0.9)
    assert len(got) == 2
    assert weighted(got, sizes) == pytest.approx(sparsity, abs=1e-12)
    assert all(0 <= x < 1 for x in got)


@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.97])
def test_invariants_uneven_sizes_many_layers(sparsity):
    rng = np.random.default_rng(1)
    counts = rng.integers(10, 1000, 12).tolist()
    sizes = rng.integers(100, 5000, 12).tolist()
    for beta in (0.2, 3.0):
        got = allocate("activation", sparsity, counts=counts, layer_sizes=sizes, beta=beta)
        assert weighted(got, sizes) == pytest.approx(sparsity, abs=1e-12)
        assert all(0 <= x < 1 for x in got)


@pytest.mark.parametrize("arch", ARCHS)
def test_owl_and_alphapruning_run_on_every_architecture(arch):
    model = tiny_model(arch)
    for method in ("owl", "alphapruning"):
        got = allocate(method, 0.5, model=model, calib_inputs=calib())
        assert weighted(got, model_layer_sizes(model)) == pytest.approx(0.5, abs=1e-12)


def test_owl_ratios_against_naive_dense_norms():
    """OWL's per-layer outlier ratios from input norms gathered by plain full-model forwards."""
    model = tiny_model("llama", seed=3)
    seqs = calib(6, 20)
    inputs = {}
    hooks = [m.module.register_forward_hook(
        lambda mod, inp, out, name=m.name: inputs.setdefault(name, []).append(
            inp[0].detach().reshape(-1, inp[0].shape[-1]))) for m in scored_matrices(model)]
    with torch.no_grad():
        model(torch.tensor(seqs))
    for h in hooks:
        h.remove()
    ratios = []
    for layer in range(2):
        scores = []
        for m in scored_matrices(model):
            if m.layer == layer:
                norm = torch.cat(inputs[m.name]).double().norm(dim=0)
                scores.append((m.weight.double().abs() * norm).flatten())
        flat = torch.cat(scores)
        ratios.append(float((flat > 2.0 * flat.mean()).double().mean()))
    expected = owl_formula(ratios, 0.5, 0.08)
    got = allocate("owl", 0.5, model=model, calib_inputs=seqs, owl_m=2.0)
    assert got == pytest.approx(expected, abs=1e-9)
    assert ratios[0] != ratios[1]


# --------------------------------------------------------------------------- bad input, profiles


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(UserError):
        allocate("uniform", bad, num_layers=3)


def test_unknown_method_and_missing_inputs():
    with pytest.raises(UserError):
        allocate("nope", 0.5, num_layers=3)
    with pytest.raises(UserError):
        allocate("activation", 0.5)
    with pytest.raises(UserError):
        allocate("owl", 0.5, model=tiny_model("llama"))


def _profile_of(model, identity):
    g = torch.Generator().manual_seed(0)
    mats = scored_matrices(model)
    maps = {m.name: torch.rand(m.module.weight.shape, generator=g) for m in mats}
    return Profile(maps, {m.name: m.layer for m in mats}, {m.name: m.matrix for m in mats},
                   {"model": identity, "dataset": "c4", "samples": 4})


def test_profile_from_another_model_is_refused():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    ident = {"spec": "a", "path": "/models/a"}
    prof = _profile_of(llama, ident)
    check_profile(prof, LoadedModel(llama, None, "a", dict(ident)))  # same: fine
    with pytest.raises(UserError, match="profile"):
        check_profile(prof, LoadedModel(llama, None, "b", {"spec": "b", "path": "/models/b"}))
    with pytest.raises(UserError, match="profile"):
        check_profile(prof, LoadedModel(gpt2, None, "a", dict(ident)))


def test_cli_allocate_activation_from_profile(tmp_path, capsys):
    from actpat.activation.profiling import counts

    prof = _profile_of(tiny_model("llama"), {"spec": "a", "path": "/a"})
    prof.save(tmp_path / "run")
    c = counts(prof, gamma_quantile=0.3)
    out = tmp_path / "alloc.json"
    rc = main(["allocate", "--sparsity", "0.5", "--method", "activation", "--profile",
               str(tmp_path / "run"), "--gamma-quantile", "0.3", "--json", str(out),
               "--plot", str(tmp_path / "a.png")])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["layer_sparsities"] == pytest.approx(activation_formula(c.layer_counts, 0.5))
    assert data["counts"]["counts"] == c.layer_counts
    assert (tmp_path / "a.png").stat().st_size > 0
    assert main(["allocate", "--sparsity", "1.2", "--method", "uniform", "--profile",
                 str(tmp_path / "run")]) == 2
    assert main(["allocate", "--sparsity", "0.5", "--method", "owl"]) == 2


def test_cli_allocate_and_prune_with_a_model(tmp_path, data_dir):
    from tinylm import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    common = ["--model", model_dir, "--data-dir", data_dir, "--calibration-samples", "3",
              "--seq-len", "40", "--quiet", "--device", "cpu"]
    for method in ("alphapruning", "activation"):
        out = tmp_path / f"{method}.json"
        assert main(["allocate", "--sparsity", "0.6", "--method", method, "--json", str(out),
                     "--profile-samples", "2"] + common) == 0
        s = json.loads(out.read_text())["layer_sparsities"]
        assert len(s) == 2 and sum(s) / 2 == pytest.approx(0.6)
    # activation counts profiled on the fly inside `prune`, recorded in actpat_prune.json
    assert main(["prune", "--sparsity", "0.6", "--allocation", "activation", "--save",
                 str(tmp_path / "p"), "--profile-samples", "2"] + common) == 0
    rec = json.loads((tmp_path / "p" / "actpat_prune.json").read_text())
    assert rec["allocation"]["counts"]["samples"] == 2
    assert rec["layer_sparsities"] == pytest.approx(
        activation_formula(rec["allocation"]["counts"]["counts"], 0.6))
    # a profile of another model is refused
    other = _profile_of(tiny_model("gpt2"), {"spec": "x", "path": "/x"})
    other.save(tmp_path / "other")
    assert main(["prune", "--sparsity", "0.6", "--allocation", "activation", "--profile",
                 str(tmp_path / "other"), "--save", str(tmp_path / "q")] + common) == 2
