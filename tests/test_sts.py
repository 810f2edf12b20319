"""STS correlation: Spearman and bootstrap against scipy, bands, pairs loading, baselines, e2e."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from actpat.errors import UserError
from actpat.models.loading import LoadedModel
from actpat.analysis.sts import (bootstrap_ci, bootstrap_indices, correlate, hidden_state_similarity,
                        load_pairs, spearman, sts_bands, sts_statistics)
from tiny import tiny_model

X = np.array([0.61, 0.52, 0.70, 0.33, 0.48, 0.91, 0.44, 0.58, 0.72, 0.39, 0.55, 0.66])
Y = np.array([3.2, 2.5, 4.0, 1.0, 2.5, 4.8, 1.5, 3.0, 3.9, 0.8, 2.0, 4.4])  # with a tie


def test_spearman_against_scipy_and_ranks():
    rho, p = spearman(X, Y)
    ref = stats.spearmanr(X, Y)
    assert abs(rho - ref.statistic) < 1e-12 and abs(p - ref.pvalue) < 1e-12
    rx, ry = stats.rankdata(X), stats.rankdata(Y)  # Pearson of average ranks, by hand
    assert abs(rho - np.corrcoef(rx, ry)[0, 1]) < 1e-12
    assert 0 < p < 0.01


def test_bootstrap_against_direct_loop():
    idx = bootstrap_indices(len(X), 500, seed=3)
    lo, hi = bootstrap_ci(X, Y, indices=idx)
    direct = [stats.spearmanr(X[i], Y[i]).statistic for i in idx]
    want = np.nanpercentile(direct, [2.5, 97.5])
    assert abs(lo - want[0]) < 1e-10 and abs(hi - want[1]) < 1e-10
    assert bootstrap_ci(X, Y, 500, seed=3) == (lo, hi)  # seeded: reproducible
    assert lo < spearman(X, Y)[0] < hi


def test_bootstrap_against_scipy_bootstrap():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    lo, hi = bootstrap_ci(x, y, 2000, seed=1)
    ref = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                          vectorized=False, n_resamples=2000, method="percentile",
                          random_state=2).confidence_interval
    assert abs(lo - ref.low) < 0.03 and abs(hi - ref.high) < 0.03


def test_correlate_columns():
    vals = np.stack([X, -X, X ** 2], axis=1)
    res = correlate(vals, Y, bootstrap_indices(len(X), 200, 0))
    for k in range(3):
        assert abs(res["rho"][k] - stats.spearmanr(vals[:, k], Y).statistic) < 1e-12
        lo, hi = res["ci"][k]
        assert lo <= hi
    assert abs(res["rho"][1] + res["rho"][0]) < 1e-12
    assert correlate(vals, Y, None)["ci"] == []


@pytest.mark.parametrize("layers,want", [
    (32, {"scaled[12:L-2]": (12, 30), "scaled[12:L]": (12, 32), "scaled[16:L-2]": (16, 30),
          "scaled[16:L]": (16, 32), "scaled[20:L-2]": (20, 30), "scaled[20:L]": (20, 32),
          "paper[12:L-2]": (12, 30), "paper[12:L]": (12, 32), "paper[16:L-2]": (16, 30),
          "paper[16:L]": (16, 32), "paper[20:L-2]": (20, 30), "paper[20:L]": (20, 32)}),
    (30, {"scaled[12:L-2]": (11, 28), "scaled[12:L]": (11, 30), "scaled[16:L-2]": (15, 28),
          "scaled[16:L]": (15, 30), "scaled[20:L-2]": (19, 28), "scaled[20:L]": (19, 30)}),
    (18, {"scaled[12:L-2]": (7, 17), "scaled[12:L]": (7, 18), "scaled[16:L-2]": (9, 17),
          "scaled[16:L]": (9, 18), "scaled[20:L-2]": (11, 17), "scaled[20:L]": (11, 18)}),
])
def test_bands(layers, want):
    got = {b.name: (b.start, b.end) for b in sts_bands(layers)}
    assert got == want
    assert all(b.kind == ("paper" if b.name.startswith("paper") else "scaled")
               for b in sts_bands(layers))


def test_sts_statistics_bands_and_baselines():
    rng = np.random.default_rng(5)
    scores = rng.uniform(0, 5, size=40)
    sims = rng.uniform(0, 1, size=(40, 30))
    sims[:, 20:] += 0.1 * scores[:, None]  # deep layers carry the signal
    base = {"hidden-mean": rng.normal(size=(40, 30))}
    res = sts_statistics(sims, {"q": sims * 0.5}, base, scores, n_resamples=200, seed=0)
    assert len(res["per_layer_spearman"]) == 30 and len(res["per_layer_ci"]) == 30
    b = res["bands"]["scaled[20:L]"]
    assert (b["start"], b["end"]) == (19, 30)
    assert abs(b["rho"] - stats.spearmanr(sims[:, 19:30].sum(1), scores).statistic) < 1e-12
    assert b["ci"][0] <= b["rho"] <= b["ci"][1]
    assert res["per_matrix_spearman"]["q"] == pytest.approx(res["per_layer_spearman"])
    assert res["baselines"]["hidden-mean"][3] == pytest.approx(
        stats.spearmanr(base["hidden-mean"][:, 3], scores).statistic)
    assert res["best"]["activation"]["layer"] >= 20
    json.dumps(res, allow_nan=False)  # valid JSON: no NaN


def test_load_pairs(tmp_path, data_dir):  # real STS-B / SICK sizes and fields
    f = tmp_path / "p.jsonl"
    rows = [{"x": f"a{i}", "y": f"b{i}", "s": i * 0.5} for i in range(6)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = load_pairs(str(f), 4, pair_fields=("x", "y", "s"))
    assert p.a == ["a0", "a1", "a2", "a3"] and list(p.scores) == [0, 0.5, 1.0, 1.5]
    with pytest.raises(UserError, match="pair-fields"):
        load_pairs(str(f), 4)  # default stsb fields are absent
    s = load_pairs("stsb", 10, seed=0, data_dir=data_dir)
    assert p.fields == ("x", "y", "s") and s.fields == ("sentence1", "sentence2", "score")
    assert s.indices == sorted(s.indices) and len(set(s.indices)) == 10
    assert load_pairs("stsb", None, data_dir=data_dir).scores.shape == (1500,)
    k = load_pairs("sick", 5, data_dir=data_dir)
    assert k.fields[2] == "relatedness_score" and 1 <= k.scores.min()
    with pytest.raises(UserError, match="not a sentence-pair"):
        load_pairs("boolq", 5, data_dir=data_dir)


def test_hidden_state_baseline_matches_unbatched():
    class Tok:
        pad_token_id = 0

    model = tiny_model("llama")
    lm = LoadedModel(model, Tok(), "llama", {})
    pairs = [([5, 6, 7], [8, 9, 10, 11, 12]), ([3, 4], [3, 4]), ([20, 21, 22, 23], [30])]
    got = hidden_state_similarity(lm, pairs, batch_size=4)
    assert got["hidden-mean"].shape == (3, 2)
    with torch.no_grad():
        for k, (a, b) in enumerate(pairs):
            ha = model(torch.tensor([a]), output_hidden_states=True).hidden_states
            hb = model(torch.tensor([b]), output_hidden_states=True).hidden_states
            for i in range(2):
                m = torch.cosine_similarity(ha[i + 1][0].mean(0), hb[i + 1][0].mean(0), dim=0)
                last = torch.cosine_similarity(ha[i + 1][0, -1], hb[i + 1][0, -1], dim=0)
                assert abs(got["hidden-mean"][k, i] - float(m)) < 1e-5
                assert abs(got["hidden-last"][k, i] - float(last)) < 1e-5
    np.testing.assert_allclose(got["hidden-mean"][1], 1.0, atol=1e-6)


def test_sts_bad_input(tmp_path, capsys):
    from helpers import fail

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"a": "x", "b": "y", "s": 1}) + "\n")
    msg = fail(capsys, "sts", "--model", "smollm2-135m", "--dataset", f, "--pair-fields", "a,b",
               "--out", tmp_path / "r")
    assert "--pair-fields 'a,b' must name three fields" in msg
    msg = fail(capsys, "sts", "--model", "smollm2-135m", "--dataset", f, "--pair-fields",
               "a,b,s", "--out", tmp_path / "r")  # one pair: too few
    assert "too few for a rank correlation" in msg and "at least 3" in msg
    assert not (tmp_path / "r" / "sts.json").exists()


@pytest.mark.slow
def test_sts_end_to_end_smollm2(tmp_path, smollm2):
    from actpat.cli import main

    rows = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
            ("A dog runs in the park.", "The stock market fell today.", 0.2),
            ("Two kids are eating lunch.", "Two kids are eating lunch.", 5.0),
            ("The cat sleeps on the sofa.", "A cat is sleeping on a couch.", 4.5),
            ("She is cooking pasta.", "He repairs a bicycle.", 0.5),
            ("A woman slices an onion.", "A woman is cutting an onion.", 4.6)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"s1": a, "s2": b, "gold": s}) + "\n" for a, b, s in rows))
    out = tmp_path / "run"
    rc = main(["sts", "--model", "smollm2-135m", "--dataset", str(f), "--pair-fields",
               "s1,s2,gold", "--samples", "0", "--bootstrap", "200", "--quiet", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "sts.json").read_text())
    L = 30
    assert res["samples"] == 6 and res["scores"] == [r[2] for r in rows]
    assert len(res["per_layer_spearman"]) == L and len(res["per_layer_ci"]) == L
    assert set(res["baselines"]) == {"hidden-mean", "hidden-last"}
    assert all(len(v) == L for v in res["baselines"].values())
    assert "scaled[16:L]" in res["bands"] and not any(k.startswith("paper") for k in res["bands"])
    sims = np.array(res["pair_similarity"])
    assert sims.shape == (6, L) and (sims >= 0).all() and (sims <= 1 + 1e-9).all()
    np.testing.assert_allclose(sims[2], 1.0, atol=1e-6)  # identical sentences, in input order
    assert (sims[[0, 1, 3, 4, 5]] < 1 - 1e-4).all()
    assert (out / "sts_layers.png").stat().st_size > 0
