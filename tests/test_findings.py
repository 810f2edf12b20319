import math

from actpat.analysis.findings import bands, finding1


def test_bands_cover_all_layers_once():
    for n in (12, 18, 30, 32):
        b = bands(n)
        layers = [i for r in b.values() for i in r]
        assert sorted(layers) == list(range(n))


def _entry(name, shares):
    return {"run": name, "dataset": name, "layer_counts": [int(s * 100) for s in shares],
            "scored_per_layer": [100] * len(shares)}


def test_finding1_on_a_pattern_that_follows_the_paper_and_one_that_does_not():
    paper_like = [0.1, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]
    general = [0.1, 0.5, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3]
    inverted = [0.6, 0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5]
    out = finding1([_entry("boolq", paper_like), _entry("c4", general), _entry("odd", inverted)])
    v = out["verdict"]
    assert v["shallow_denser_than_deep"] == {"boolq": True, "c4": True, "odd": False}
    assert v["first_sparser_than_shallow"] == {"boolq": True, "c4": True, "odd": False}
    assert out["per_dataset"]["boolq"]["first"] == 0.1
    assert abs(out["per_dataset"]["boolq"]["shallow"] - (0.5 + 0.5 + 0.4) / 3) < 1e-12
    assert v["general_keeps_more_deep_activation"] is False  # 'odd' is very dense in deep layers
    out = finding1([_entry("boolq", paper_like), _entry("c4", general)])
    assert out["verdict"]["general_keeps_more_deep_activation"] is True


def _calib(calibration, accs, pruner="wanda", n=100, seed=0):
    return {"config": {"pruner": pruner, "calibration": calibration, "seed": seed},
            "eval": {t: {"acc": a, "n": n} for t, a in accs.items()}}


def _relate(names, matrix):
    return {"datasets": names, "bands": {"all": {"matrix": matrix}}}


def test_calibration_specificity_own_set_rank_margin_and_relatedness():
    from actpat.analysis.findings import calibration_specificity

    results = [
        _calib(None, {"a": 0.9, "b": 0.9}, pruner=None),
        _calib("a", {"a": 0.60, "b": 0.40}),  # a helps a most
        _calib("b", {"a": 0.50, "b": 0.42}),  # b helps b most, by 0.02
        _calib("c", {"a": 0.55, "b": 0.30}),  # c: no task of its own
    ]
    out = calibration_specificity(results)
    assert out["calibrations"] == ["a", "b", "c"] and out["tasks"] == ["a", "b"]
    assert out["dense"] == {"a": 0.9, "b": 0.9}
    own = out["own"]
    assert own["a"]["rank"] == 1 and own["a"]["of"] == 3
    assert abs(own["a"]["margin"] - 0.05) < 1e-12
    p = (0.60 + 0.50 + 0.55) / 3
    assert abs(out["se"]["a"] - math.sqrt(p * (1 - p) / 100)) < 1e-12
    assert abs(own["a"]["margin_se"] - 0.05 / out["se"]["a"]) < 1e-12
    assert own["b"]["rank"] == 1 and abs(own["b"]["margin"] - 0.02) < 1e-12
    assert out["own_best"] == 2 and out["own_best_by_1se"] == 1  # 0.02 < one SE (about 0.048)
    assert out["own_tied_best"] == 0
    tied = calibration_specificity(results[:2] + [_calib("b", {"a": 0.5, "b": 0.40}),
                                                  _calib("c", {"a": 0.5, "b": 0.40})])
    assert tied["own"]["b"]["rank"] == 1 and tied["own"]["b"]["margin"] == 0
    assert tied["own_best"] == 1 and tied["own_tied_best"] == 1
    # two seeds of one calibration set: their mean, half their range
    two = calibration_specificity(results + [_calib("a", {"a": 0.40, "b": 0.44}, seed=1)])
    assert two["seeds"]["a"] == [0, 1] and two["seeds"]["b"] == [0]
    assert abs(two["acc"]["a"]["a"] - 0.50) < 1e-12 and abs(two["spread"]["a"]["a"] - 0.10) < 1e-12
    assert two["own"]["a"]["rank"] == 2  # c (0.55) is now better on a; b (0.50) ties

    # a set that loses on its own task gets a worse rank
    worse = calibration_specificity(results[:3] + [_calib("c", {"a": 0.7, "b": 0.5})])
    assert worse["own"]["a"]["rank"] == 2 and worse["own"]["b"]["rank"] == 2
    assert worse["own_best"] == 0

    # relatedness: accuracy (centred per task) rises with r(X, T) -> rho = 1
    rel = _relate(["a", "b", "c"], [[1.0, 0.5, 0.8], [0.5, 1.0, 0.2], [0.8, 0.2, 1.0]])
    r = calibration_specificity(results, relatedness=rel)["relatedness"]["all"]
    assert r["n_pairs"] == 6 and r["n_pairs_without_own"] == 4
    # task a: r = (1, .5, .8) for acc (.60, .50, .55); task b: r = (.5, 1, .2) for (.40, .42, .30)
    from scipy.stats import spearmanr
    xs = [1.0, 0.5, 0.8, 0.5, 1.0, 0.2]
    ys = [0.60 - p, 0.50 - p, 0.55 - p] + [0.40 - 0.3733333, 0.42 - 0.3733333, 0.30 - 0.3733333]
    assert abs(r["spearman"] - spearmanr(xs, ys).statistic) < 1e-9
    assert r["spearman_without_own"] is not None
