"""Allocators: invariants (weighted mean S, each S_i in [0, 1)) and formulas on fixed inputs."""

import json
import math
import statistics

import numpy as np
import pytest
import torch

from actpat.sparsity.allocation import (MAX_SPARSITY, activation_formula, alphapruning_formula,
                                        fix_mean, hill_alpha, model_layer_sizes, owl_formula)
from actpat.sparsity.allocators import ALLOCATORS, allocate, check_profile
from actpat.cli import main
from actpat.errors import UserError
from actpat.models.architectures import scored_matrices
from actpat.models.loading import LoadedModel
from actpat.activation.profiling import Profile
from helpers import calib as _calib
from helpers import fail
from reference import linear_modules, out_in
from tiny import ARCHS, tiny_model


def weighted(values, sizes):
    return sum(v * w for v, w in zip(values, sizes)) / sum(sizes)


def calib(n=4, t=16, seed=0):
    return _calib(n, t, seed)


def activation_by_hand(counts, s, a=2.0, b=0.2):
    """METHOD.md section 4 with the standard library: z-score, sigmoid(z + a), S + bS(1 - ...)."""
    mu, sd = statistics.fmean(counts), statistics.pstdev(counts)
    n_prime = [1 / (1 + math.exp(-(((c - mu) / sd if sd else 0.0) + a))) for c in counts]
    total = sum(n_prime)
    return [s + b * s * (1 - x * len(counts) / total) for x in n_prime]


def capped(raw, s, sizes, cap=MAX_SPARSITY):
    """The documented invariants as a fixed point, solved by bisection: S_i = min(cap, c * raw_i)
    with the one factor c that makes the size-weighted mean S."""
    raw = [max(0.0, x) for x in raw]
    lo, hi = 0.0, 1.0
    while weighted([min(cap, hi * x) for x in raw], sizes) < s:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if weighted([min(cap, mid * x) for x in raw], sizes) < s else (lo, mid)
    return [min(cap, hi * x) for x in raw]


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
    # by hand: x 2.7/2.2 puts layer 1 over the cap; the rest, 2.7 - 0.999 = 1.701, spread over
    # layers 0 and 2 in proportion 0.5 : 0.2 puts layer 0 over the cap too; layer 2 takes
    # 2.7 - 2 * 0.999 = 0.702
    assert fix_mean([0.5, 1.5, 0.2], 0.9, [1, 1, 1]) == pytest.approx([0.999, 0.999, 0.702],
                                                                         abs=1e-12)
    # sizes 3 : 1, weighted mean of the input 0.25 -> one factor 1.2
    assert fix_mean([0.2, 0.4], 0.3, [3, 1]) == pytest.approx([0.24, 0.48], abs=1e-12)
    assert fix_mean([-0.1, 0.2], 0.1, [1, 1]) == pytest.approx([0.0, 0.2], abs=1e-12)
    assert fix_mean([0.0, 0.0], 0.4, [1, 3]) == pytest.approx([0.4, 0.4], abs=1e-12)
    assert fix_mean([0.3, 0.6], 0.0, [1, 1]) == [0.0, 0.0]


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_every_allocator_against_its_formula(sparsity):
    """Each allocator's own output (before ``fix_mean``) already has the weighted mean S, and
    ``allocate`` returns the documented capped values, computed here by hand."""
    model = tiny_model("llama")
    sizes = model_layer_sizes(model)
    assert sizes[0] == sizes[1] == sum(m.weight.numel() for n, (i, _, m) in
                                       linear_modules(model).items() if i == 0)
    kw = dict(model=model, calib_inputs=calib(), layer_sizes=sizes, alpha=2.0, beta=0.9,
              held_inputs=calib(2, 16, seed=5), atp_step=0.1, search_budget=3)
    from actpat.sparsity.per_matrix import flatten, model_matrix_sizes

    msizes = model_matrix_sizes(model)
    mcounts = {t: [300 - 10 * k, 40 + 5 * k] for k, t in enumerate(msizes)}
    for method in sorted(ALLOCATORS):
        raw = ALLOCATORS[method].fn(sparsity, counts=[300, 40], matrix_counts=mcounts,
                                    matrix_sizes=msizes, **kw)
        if ALLOCATORS[method].per_matrix:  # one value per matrix; plain mean S before the fix
            assert set(raw) == set(msizes) and all(len(v) == 2 for v in raw.values())
            if method == "activation-matrix":
                assert np.mean(flatten(raw)) == pytest.approx(sparsity, abs=1e-12)
            got = allocate(method, sparsity, matrix_counts=mcounts, matrix_sizes=msizes,
                           **{k: v for k, v in kw.items() if k != "layer_sizes"})
            w = flatten({t: msizes[t] for t in got.per_matrix})
            assert weighted(flatten(got.per_matrix), w) == pytest.approx(sparsity, abs=1e-9)
            assert all(0 <= x <= MAX_SPARSITY for x in flatten(got.per_matrix)), method
            continue
        assert len(raw) == 2
        assert weighted(raw, sizes) == pytest.approx(sparsity, abs=1e-12), method
    assert allocate("uniform", sparsity, model=model) == [sparsity, sparsity]
    want = capped(activation_by_hand([300, 40], sparsity, b=0.9), sparsity, sizes)
    got = allocate("activation", sparsity, counts=[300, 40], model=model, beta=0.9)
    assert got == pytest.approx(want, abs=1e-9)
    if sparsity == 0.95:  # z = +-1: raw 0.8814 S and 1.1186 S; layer 1 capped, layer 0 the rest
        assert got == pytest.approx([2 * 0.95 - MAX_SPARSITY, MAX_SPARSITY], abs=1e-12)


@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.97])
def test_activation_uneven_sizes_many_layers_against_the_invariants(sparsity):
    rng = np.random.default_rng(1)
    counts = rng.integers(10, 1000, 12).tolist()
    sizes = rng.integers(100, 5000, 12).tolist()
    for beta in (0.2, 3.0):
        want = capped(activation_by_hand(counts, sparsity, b=beta), sparsity, sizes)
        got = allocate("activation", sparsity, counts=counts, layer_sizes=sizes, beta=beta)
        assert got == pytest.approx(want, abs=1e-9), beta
        assert weighted(got, sizes) == pytest.approx(sparsity, abs=1e-12)
    clipped = allocate("activation", 0.97, counts=counts, layer_sizes=sizes, beta=3.0)
    assert clipped.count(MAX_SPARSITY) >= 1  # this case does hit the cap


def _alpha_by_loops(weight) -> float:
    w = out_in(weight).detach().double().numpy() if isinstance(weight, torch.nn.Module) \
        else weight.detach().double().numpy()
    eigs = np.linalg.svd(w, compute_uv=False) ** 2
    return _hill_loop(eigs[eigs > 1e-10 * eigs.max()])


def test_alphapruning_against_svd_and_hill_loops():
    """Per-matrix alpha (numpy SVD + plain Hill/KS loops), averaged per layer, mapped onto
    [(1-eps)S, (1+eps)S] and rescaled to the weighted mean, by hand."""
    model = tiny_model("llama", seed=4)
    per_layer: dict[int, list[float]] = {}
    for name, (i, _, module) in linear_modules(model).items():
        per_layer.setdefault(i, []).append(_alpha_by_loops(module))
    block = [statistics.fmean(per_layer[i]) for i in sorted(per_layer)]
    sizes = model_layer_sizes(model)
    lo, hi = min(block), max(block)
    assert hi > lo
    ratios = [0.7 + (a - lo) / (hi - lo) * 0.6 for a in block]
    scale = 0.5 * sum(sizes) / sum(r * w for r, w in zip(ratios, sizes))
    want = [r * scale for r in ratios]
    assert allocate("alphapruning", 0.5, model=model) == pytest.approx(want, rel=1e-9)
    assert allocate("alphapruning", 0.5, model=model, eps=0.3)[int(np.argmax(block))] == \
        max(want)  # the most heavy-tailed (largest alpha) layer is pruned most


@pytest.mark.slow
def test_alphapruning_alpha_on_real_smollm2_spectra(smollm2):
    """matrix_alpha on real trained spectra (SmolLM2) equals the plain-loop estimate."""
    from actpat.sparsity.allocation import matrix_alpha

    mods = linear_modules(smollm2.model)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.15.self_attn.q_proj",
                 "model.layers.29.mlp.down_proj"):
        module = mods[name][2]
        got = matrix_alpha(out_in(module))
        assert got == pytest.approx(_alpha_by_loops(module), rel=1e-9), name
        assert 1 < got < 20, name


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
    mods = linear_modules(model)
    hooks = [module.register_forward_hook(
        lambda mod, inp, out, name=name: inputs.setdefault(name, []).append(
            inp[0].detach().reshape(-1, inp[0].shape[-1]))) for name, (_, _, module) in mods.items()]
    with torch.no_grad():
        model(torch.tensor(seqs))
    for h in hooks:
        h.remove()
    ratios = []
    for layer in range(2):
        scores = []
        for name, (i, _, module) in mods.items():
            if i == layer:
                norm = torch.cat(inputs[name]).double().norm(dim=0)
                scores.append((out_in(module).double().abs() * norm).flatten())
        flat = torch.cat(scores)
        ratios.append(float((flat > 2.0 * flat.mean()).double().mean()))
    expected = owl_formula(ratios, 0.5, 0.08)
    got = allocate("owl", 0.5, model=model, calib_inputs=seqs, owl_m=2.0)
    assert got == pytest.approx(expected, abs=1e-9)
    assert ratios[0] != ratios[1]


# --------------------------------------------------------------------------- bad input, profiles


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(UserError, match=r"sparsity must be in \[0, 1\)"):
        allocate("uniform", bad, num_layers=3)


def test_unknown_method_and_missing_inputs():
    with pytest.raises(UserError, match="unknown allocation 'nope'"):
        allocate("nope", 0.5, num_layers=3)
    with pytest.raises(UserError, match="needs activated-weight counts"):
        allocate("activation", 0.5)
    with pytest.raises(UserError, match="owl allocation needs the model and calibration data"):
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
    # counted by hand from the maps: 30% of all values above gamma, then per layer
    values = torch.cat([v.flatten() for v in prof.maps.values()])
    assert abs(float((values > c.gamma).double().mean()) - 0.3) <= 1 / values.numel()
    by_layer = [sum(int((v > c.gamma).sum()) for k, v in prof.maps.items() if prof.layers[k] == i)
                for i in range(2)]
    assert by_layer == c.layer_counts
    assert data["layer_sparsities"] == pytest.approx(activation_by_hand(by_layer, 0.5), abs=1e-12)
    assert data["counts"]["counts"] == by_layer
    assert (tmp_path / "a.png").stat().st_size > 0
    assert "[0, 1)" in fail(capsys, "allocate", "--sparsity", "1.2", "--method", "uniform",
                            "--profile", tmp_path / "run")
    assert "--model" in fail(capsys, "allocate", "--sparsity", "0.5", "--method", "owl")


def test_cli_allocate_and_prune_with_a_model(tmp_path, any_data, capsys):
    from transformers import AutoModelForCausalLM

    from tinylm import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    common = ["--model", model_dir, "--data-dir", any_data, "--calibration-samples", "3",
              "--seq-len", "40", "--quiet", "--device", "cpu"]
    for method in ("alphapruning", "activation"):
        out = tmp_path / f"{method}.json"
        assert main(["allocate", "--sparsity", "0.6", "--method", method, "--json", str(out),
                     "--profile-samples", "2"] + common) == 0
        s = json.loads(out.read_text())["layer_sparsities"]
        assert len(s) == 2 and sum(s) / 2 == pytest.approx(0.6)
        if method == "alphapruning":  # data-free: the library's numbers on the same weights
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            assert s == pytest.approx(allocate("alphapruning", 0.6, model=model), abs=1e-12)
    # activation counts profiled on the fly inside `prune`, recorded in actpat_prune.json
    assert main(["prune", "--sparsity", "0.6", "--allocation", "activation", "--save",
                 str(tmp_path / "p"), "--profile-samples", "2"] + common) == 0
    rec = json.loads((tmp_path / "p" / "actpat_prune.json").read_text())
    assert rec["allocation"]["counts"]["samples"] == 2
    assert rec["layer_sparsities"] == pytest.approx(
        activation_by_hand(rec["allocation"]["counts"]["counts"], 0.6), abs=1e-9)
    # a profile of another model is refused
    other = _profile_of(tiny_model("gpt2"), {"spec": "x", "path": "/x"})
    other.save(tmp_path / "other")
    msg = fail(capsys, "prune", "--sparsity", "0.6", "--allocation", "activation", "--profile",
               tmp_path / "other", "--save", tmp_path / "q", *common)
    assert "profile was computed on model 'x'" in msg
    assert not (tmp_path / "q" / "actpat_prune.json").exists()
