"""The search allocator: mean-preserving moves, bounds, determinism and resuming, finding a known
optimum with a fake scorer, and the mask scorer against the real Wanda pruner on tiny models."""

import math

import numpy as np
import pytest
import torch

from actpat.errors import UserError
from actpat.sparsity.allocation_search import MaskScorer, SearchSettings, evolve, pair_move
from actpat.sparsity.layerwise import prune_model
from helpers import calib
from tiny import ARCHS, tiny_model


def weighted(values, sizes):
    return float(np.dot(values, sizes) / np.sum(sizes))


def test_pair_move_by_hand_keeps_the_weighted_mean():
    w = np.array([1.0, 2.0, 3.0])  # mean 2: layer 0 gets 0.1 * 2/1, layer 2 gives 0.1 * 2/3
    got = pair_move(np.array([0.5, 0.5, 0.5]), 0, 2, 0.1, w)
    assert got == pytest.approx([0.7, 0.5, 0.5 - 0.2 / 3], abs=1e-15)
    assert weighted(got, w) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("sizes", [None, [3, 1, 4, 1, 5, 9]])
def test_every_candidate_keeps_mean_and_bounds(sizes):
    seen = []
    start = [0.6] * 6

    def score(s):
        seen.append(s)
        return float(np.sum(np.square(np.asarray(s) - 0.6 + np.arange(6) * 0.01)))

    st = SearchSettings(budget=60, seed=3, step=0.08, lo=0.45, hi=0.75)
    res = evolve(start, score, sizes, st)
    assert len(seen) == res.evaluations <= 60
    w = sizes or [1] * 6
    for s in seen + [res.sparsities]:
        assert weighted(s, w) == pytest.approx(0.6, abs=1e-12)
        assert min(s) >= 0.45 - 1e-12 and max(s) <= 0.75 + 1e-12
    assert len({tuple(s) for s in seen}) == len(seen)  # no candidate scored twice


def test_finds_a_known_optimum_and_never_returns_worse():
    target = np.array([0.44, 0.48, 0.52, 0.56, 0.50, 0.50])  # mean 0.5, on the 0.02 grid

    def score(s):
        return float(np.sum((np.asarray(s) - target) ** 2))

    res = evolve([0.5] * 6, score, None, SearchSettings(budget=300, seed=0, step=0.02))
    assert res.score < 1e-20
    assert res.sparsities == pytest.approx(target.tolist(), abs=1e-9)
    assert res.score <= res.start_score == pytest.approx(score([0.5] * 6))


def test_noisy_scores_never_worse_than_start():
    rng = np.random.default_rng(0)
    table = {}

    def score(s):  # random but fixed per candidate
        return table.setdefault(tuple(np.round(s, 10)), float(rng.normal()))

    res = evolve([0.5] * 5, score, None, SearchSettings(budget=40, seed=1))
    assert res.score <= res.start_score
    assert res.score == min(table.values())  # (1 + lambda) keeps the best scored so far
    assert score(res.sparsities) == res.score


def test_deterministic_from_seed_and_resumable(tmp_path):
    def score(s):
        return float(np.sum(np.square(np.asarray(s) - np.linspace(0.4, 0.6, 8))) + math.sin(s[0]))

    st = SearchSettings(budget=30, seed=7)
    a = evolve([0.5] * 8, score, None, st)
    b = evolve([0.5] * 8, score, None, SearchSettings(budget=30, seed=7))
    assert a.sparsities == b.sparsities and a.history == b.history
    c = evolve([0.5] * 8, score, None, SearchSettings(budget=30, seed=8))
    assert c.history != a.history
    # resume: 12 candidates, then the same state file continued to 30 = one run of 30
    state = tmp_path / "search.json"
    first = evolve([0.5] * 8, score, None, SearchSettings(budget=12, seed=7), state)
    assert first.evaluations == 12
    calls = []
    resumed = evolve([0.5] * 8, lambda s: calls.append(1) or score(s), None,
                     SearchSettings(budget=30, seed=7), state)
    assert resumed.sparsities == a.sparsities and resumed.history == a.history
    assert len(calls) == 30 - 12  # nothing scored twice across the restart
    with pytest.raises(UserError, match="another start or settings"):
        evolve([0.5] * 8, score, None, SearchSettings(budget=30, seed=9), state)


def test_bad_settings():
    with pytest.raises(UserError, match="search-budget"):
        evolve([0.5, 0.5], sum, None, SearchSettings(budget=0))
    with pytest.raises(UserError, match="start leaves"):
        evolve([0.2, 0.8], sum, None, SearchSettings(lo=0.3, hi=0.7))


# --------------------------------------------------------------------------- the mask scorer


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_scorer_at_reference_is_the_wanda_pruner(arch):
    """The scorer's model at its reference allocation equals actpat's Wanda pruning bit for bit,
    and any other allocation with the reference's input norms (one layer changed: layer 1 keeps
    layer 0's pruned outputs, so only its own mask differs)."""
    seqs = calib(7, 24)
    held = calib(3, 24, seed=9)
    ref = [0.4, 0.6]
    model = tiny_model(arch, seed=1)
    dense = weights(model)
    expected = tiny_model(arch, seed=1)
    prune_model(expected, seqs, ref, "wanda", batch_size=3, progress=False)
    scorer = MaskScorer(model, seqs, held, ref, batch_size=3)
    got = weights(model)
    for k, v in weights(expected).items():
        assert torch.equal(got[k], v), k
    other = tiny_model(arch, seed=1)
    prune_model(other, seqs, [0.4, 0.8], "wanda", batch_size=3, progress=False)
    scorer([0.4, 0.8])
    got = weights(model)
    for k, v in weights(other).items():
        assert torch.equal(got[k], v), k
    scorer.restore()
    for k, v in weights(model).items():
        assert torch.equal(dense[k], v), k


def test_scorer_kl_and_ppl_against_plain_forwards():
    seqs, held = calib(6, 20), calib(4, 20, seed=5)
    model = tiny_model("llama", seed=2)
    dense_model = tiny_model("llama", seed=2)
    ids = torch.tensor(held)
    with torch.no_grad():
        p = torch.log_softmax(dense_model(ids).logits[:, :-1].double(), -1)
    kl = MaskScorer(model, seqs, held, [0.5, 0.5], metric="kl", batch_size=3)
    pruned = tiny_model("llama", seed=2)
    prune_model(pruned, seqs, [0.5, 0.5], "wanda", batch_size=3, progress=False)
    with torch.no_grad():
        q = torch.log_softmax(pruned(ids).logits[:, :-1].double(), -1)
    expected_kl = float((p.exp() * (p - q)).sum(-1).mean())
    # float32 log-probabilities: about 1e-7 nats of rounding in a per-token KL
    assert kl([0.5, 0.5]) == pytest.approx(expected_kl, abs=1e-7)
    assert expected_kl > 1e-4
    assert kl([0.0, 0.0]) == pytest.approx(0.0, abs=1e-7)  # the dense model
    nll = -q.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
    kl.restore()
    ppl = MaskScorer(model, seqs, held, [0.5, 0.5], metric="ppl", batch_size=3)
    assert ppl([0.5, 0.5]) == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_search_on_a_tiny_model_is_consistent_and_not_worse():
    seqs, held = calib(6, 20), calib(4, 20, seed=5)
    model = tiny_model("qwen2", seed=4)
    start = [0.55, 0.45]
    with MaskScorer(model, seqs, held, start, batch_size=3) as scorer:
        res = evolve(start, scorer, None, SearchSettings(budget=12, seed=0, step=0.05))
        assert res.score <= res.start_score
        assert scorer(res.sparsities) == res.score  # scores do not depend on what ran before
        assert scorer(start) == res.start_score
    with pytest.raises(UserError, match="held-apart"):
        MaskScorer(model, seqs, [], start)


def test_search_allocation_entry_on_a_tiny_model():
    from actpat.sparsity.allocation import activation_formula, fix_mean, model_layer_sizes
    from actpat.sparsity.allocation_search import search_allocation

    seqs, held = calib(6, 20), calib(4, 20, seed=5)
    model = tiny_model("llama", seed=6)
    dense = weights(model)
    sizes = model_layer_sizes(model)
    info = {}
    got = search_allocation(0.6, model=model, calib_inputs=seqs, held_inputs=held,
                            counts=[30, 10], layer_sizes=sizes, batch_size=3, info=info,
                            search=SearchSettings(budget=9, seed=2, step=0.05))
    assert weighted(got, sizes) == pytest.approx(0.6, abs=1e-12)
    start = fix_mean(activation_formula([30, 10], 0.6), 0.6, sizes)
    assert info["search"]["start"] == pytest.approx(start)
    assert info["search"]["evaluations"] == 9
    assert info["search"]["score"] <= info["search"]["start_score"]
    for k, v in weights(model).items():  # the model is handed back dense
        assert torch.equal(dense[k], v), k
    with pytest.raises(UserError, match="counts"):
        search_allocation(0.6, model=model, calib_inputs=seqs, held_inputs=held)
