"""Checks of the paper's claims on computed results: Finding 1 on activation counts (docs/method.md
section 3) and validation 2, calibration specificity, on pruning results (section 5).

Finding 1: for same-domain inputs, shallow layers (except the first) are activated densely, deep
layers and the first layer sparsely; general corpora (C4, WikiText-2) keep more activation in
deep layers than domain-specific data. ``finding1`` turns the output of ``actpat counts --json``
into the numbers that decide each part, and a verdict per part, so the write-up cannot drift
from the data.
"""

from __future__ import annotations

GENERAL = ("c4", "wikitext2")


def bands(num_layers: int) -> dict[str, range]:
    """First layer, shallow (layers 1 .. L/3), middle, deep (last third) — 0-based."""
    third = max(num_layers // 3, 1)
    return {"first": range(0, 1), "shallow": range(1, third + 1),
            "middle": range(third + 1, num_layers - third), "deep": range(num_layers - third, num_layers)}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def finding1(results: list[dict]) -> dict:
    """Per-dataset band shares and the verdict on each part of Finding 1.

    ``results``: entries of ``actpat counts --json`` (one per run, one gamma for all).
    Share = activated weights / scored weights of the layer.
    """
    num_layers = len(results[0]["layer_counts"])
    b = bands(num_layers)
    per_dataset = {}
    for r in results:
        share = [c / s for c, s in zip(r["layer_counts"], r["scored_per_layer"])]
        per_dataset[r.get("dataset") or r["run"]] = {k: _mean(share[i] for i in v) for k, v in b.items()}
    domain = {k: v for k, v in per_dataset.items() if k not in GENERAL}
    general = {k: v for k, v in per_dataset.items() if k in GENERAL}
    verdict = {
        "shallow_denser_than_deep": {k: v["shallow"] > v["deep"] for k, v in per_dataset.items()},
        "first_sparser_than_shallow": {k: v["first"] < v["shallow"] for k, v in per_dataset.items()},
    }
    if domain and general:
        verdict["general_deep_share_minus_domain"] = (
            _mean(v["deep"] for v in general.values()) - _mean(v["deep"] for v in domain.values()))
        verdict["general_keeps_more_deep_activation"] = verdict["general_deep_share_minus_domain"] > 0
    return {"bands": {k: [v.start, v.stop - 1] for k, v in b.items()},
            "per_dataset": per_dataset, "verdict": verdict}


def calibration_specificity(results: list[dict], metric: str = "acc",
                            relatedness: dict | None = None) -> dict:
    """Validation 2: does pruning calibrated on dataset X keep task X (and related tasks) best?

    ``results``: ``actpat reproduce calibration`` records (same pruner and sparsity, one or more
    calibration seeds per calibration set, each evaluated zero-shot); dense records are used as
    the reference. With several seeds, ``acc[X][T]`` is their mean, ``spread[X][T]`` half their
    range and ``seeds[X]`` the seeds.
    ``relatedness``: an ``actpat relate`` JSON; each of its bands' matrices gives r(X, T).

    Returns the accuracy matrix ``acc[X][T]``, its standard errors, and for every task that is
    also a calibration set the *own-set* check: the rank of ``acc[T][T]`` among ``acc[*][T]``
    (1 = best; ties share the better rank) and its margin over the best other set, also in
    standard errors; ``own_best`` counts the tasks whose own set is strictly best,
    ``own_tied_best`` those where it ties for best. ``centred[X][T]`` is ``acc[X][T]`` minus
    task T's mean over the calibration sets, so that task difficulty does not count. With
    ``relatedness``: the Spearman correlation between r(X, T) and ``centred[X][T]`` over all
    (X, T) pairs present in both, with and without the own-set pairs (r = 1), per layer band.
    """
    import math

    runs, n, dense, seeds = {}, {}, {}, {}  # runs[X][T]: one accuracy per seed
    for rec in results:
        ev, c = rec["eval"], rec["config"]
        row = {t: v[metric] for t, v in ev.items() if metric in v}
        if not row:
            continue
        if c["pruner"] is None:
            dense.update(row)
        else:
            seeds.setdefault(c["calibration"], []).append(c.get("seed", 0))
            for t, v in row.items():
                runs.setdefault(c["calibration"], {}).setdefault(t, []).append(v)
        n.update({t: v.get("n") for t, v in ev.items() if metric in v})
    acc = {x: {t: _mean(v) for t, v in row.items()} for x, row in runs.items()}
    spread = {x: {t: (max(v) - min(v)) / 2 for t, v in row.items()} for x, row in runs.items()}
    tasks = sorted({t for row in acc.values() for t in row})
    task_mean = {t: _mean(row[t] for row in acc.values() if t in row) for t in tasks}
    centred = {x: {t: v - task_mean[t] for t, v in row.items()} for x, row in acc.items()}
    # binomial standard error of one accuracy, at the task's mean accuracy
    se = {t: math.sqrt(p * (1 - p) / n[t]) for t, p in task_mean.items() if n.get(t)}
    own = {}
    for t in tasks:
        if t not in acc or t not in acc[t]:
            continue
        others = [acc[x][t] for x in acc if x != t and t in acc[x]]
        if not others:
            continue
        margin = acc[t][t] - max(others)
        own[t] = {"acc": acc[t][t], "rank": 1 + sum(o > acc[t][t] for o in others),
                  "of": 1 + len(others), "best_other": max(others), "margin": margin,
                  "margin_se": margin / se[t] if se.get(t) else None}
    out = {"metric": metric, "tasks": tasks, "calibrations": sorted(acc), "acc": acc,
           "spread": spread, "centred": centred,
           "seeds": {x: sorted(s) for x, s in seeds.items()},
           "dense": dense, "n": {t: n[t] for t in tasks}, "se": se, "own": own,
           "own_best": sum(v["margin"] > 0 for v in own.values()),  # strictly best
           "own_tied_best": sum(v["margin"] == 0 for v in own.values()),
           "own_best_by_1se": sum((v["margin_se"] or 0) > 1 for v in own.values())}
    if relatedness is not None:
        out["relatedness"] = {band: _relatedness_correlation(centred, relatedness, band)
                              for band in relatedness["bands"]}
    return out


def _relatedness_correlation(centred: dict, relate: dict, band: str) -> dict:
    import warnings

    from scipy.stats import spearmanr

    names = relate["datasets"]
    matrix = relate["bands"][band]["matrix"]
    pairs = [(x, t, matrix[names.index(x)][names.index(t)], v)  # (calibration, task, r, centred)
             for x, row in centred.items() if x in names
             for t, v in row.items() if t in names]

    def rho(ps):
        if len(ps) < 3:
            return None
        with warnings.catch_warnings():  # constant input: NaN, reported as None below
            warnings.simplefilter("ignore")
            r = spearmanr([p[2] for p in ps], [p[3] for p in ps]).statistic
        return None if r != r else float(r)  # NaN (constant input) -> None

    off = [p for p in pairs if p[0] != p[1]]
    return {"pairs": [list(p) for p in sorted(pairs)],
            "spearman": rho(pairs), "spearman_without_own": rho(off),
            "n_pairs": len(pairs), "n_pairs_without_own": len(off)}
