"""Checks of the paper's Finding 1 on computed counts (METHOD.md section 6).

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
