"""Per-matrix budgets: the formula on fixed inputs against plain numpy, the per-layer case as a
special case, the size-weighted mean and the bounds, pruning to per-matrix targets (in memory,
through the CLI), and the per-matrix search on a tiny model."""

import json
import math

import pytest
import torch

from actpat.cli import main
from actpat.errors import UserError
from actpat.sparsity.allocation import MAX_SPARSITY, activation_formula
from actpat.sparsity.allocators import allocate
from actpat.sparsity.layerwise import prune_model
from actpat.sparsity.per_matrix import (MatrixSparsities, activation_matrix_formula, expand,
                                        fix_matrix_mean, model_matrix_sizes)
from helpers import calib
from tiny import tiny_model
from tinylm import save_tiny_lm

COUNTS = {"q": [40, 10, 5], "v": [90, 80, 30], "up": [200, 50, 20]}
SIZES = {"q": [100, 100, 100], "v": [100, 100, 100], "up": [400, 400, 400]}


def by_hand(counts, sizes, s, alpha=2.0, beta=0.2):
    """The module doc's formula, written out over (type, layer) pairs."""
    keys = [(t, i) for t in counts for i in range(len(counts[t]))]
    d = {k: counts[k[0]][k[1]] / sizes[k[0]][k[1]] for k in keys}
    mean = sum(d.values()) / len(keys)
    std = math.sqrt(sum((x - mean) ** 2 for x in d.values()) / len(keys))
    sig = {k: 1 / (1 + math.exp(-((d[k] - mean) / std + alpha))) for k in keys}
    total = sum(sig.values())
    return {k: s + beta * s * (1 - sig[k] * len(keys) / total) for k in keys}


def weighted_mean(per_matrix, sizes):
    num = sum(per_matrix[t][i] * sizes[t][i] for t in sizes for i in range(len(sizes[t])))
    return num / sum(sum(v) for v in sizes.values())


def test_formula_on_fixed_inputs_against_plain_python():
    got = activation_matrix_formula(COUNTS, SIZES, 0.5)
    ref = by_hand(COUNTS, SIZES, 0.5)
    for (t, i), v in ref.items():
        assert got[t][i] == pytest.approx(v, abs=1e-12)
    # more activated share -> less sparsity: v (0.9 of its weights) below up (0.05)
    assert got["v"][0] < got["q"][0] < got["up"][2]


def test_layers_are_the_special_case_of_equal_matrices():
    """One matrix type whose matrices all have one size: exactly the paper's per-layer formula."""
    counts = [7, 3, 9, 4, 4]
    got = activation_matrix_formula({"all": counts}, {"all": [50] * 5}, 0.6, 1.5, 0.3)
    assert got["all"] == pytest.approx(activation_formula(counts, 0.6, 1.5, 0.3), abs=1e-15)
    per_layer = [0.3, 0.5, 0.7]
    m = expand(per_layer, SIZES)
    assert list(m) == pytest.approx(per_layer) and m.per_matrix["v"] == per_layer


@pytest.mark.parametrize("s", [0.3, 0.7, 0.9])
def test_fix_matrix_mean_keeps_the_weighted_mean_and_bounds(s):
    raw = {"q": [0.99, 1.4, 0.2], "v": [0.1, 0.0, 0.5], "up": [s, s, 1.2]}
    got = fix_matrix_mean(raw, s, SIZES)
    assert weighted_mean(got.per_matrix, SIZES) == pytest.approx(s, abs=1e-12)
    assert all(0 <= x <= MAX_SPARSITY for v in got.per_matrix.values() for x in v)
    for i, layer in enumerate(got):  # the list: each layer's size-weighted mean
        n = sum(SIZES[t][i] for t in SIZES)
        assert layer == pytest.approx(sum(got.per_matrix[t][i] * SIZES[t][i] for t in SIZES) / n)
    with pytest.raises(UserError, match="matrix types"):
        fix_matrix_mean({"q": [0.5] * 3}, 0.5, SIZES)


def test_allocate_by_name_from_counts():
    from actpat.activation.profiling import Counts

    c = Counts(0.1, "absolute", [sum(COUNTS[t][i] for t in COUNTS) for i in range(3)], COUNTS,
               [600] * 3, SIZES)
    got = allocate("activation-matrix", 0.5, counts=c)
    assert isinstance(got, MatrixSparsities)
    assert weighted_mean(got.per_matrix, SIZES) == pytest.approx(0.5, abs=1e-12)
    raw = by_hand(COUNTS, SIZES, 0.5)  # already size-weighted mean 0.5? then fix_mean is a scale
    assert got.per_matrix["v"][0] < got.per_matrix["up"][2]
    scale = 0.5 * sum(sum(v) for v in SIZES.values()) / sum(raw[k] * SIZES[k[0]][k[1]]
                                                             for k in raw)
    for (t, i), v in raw.items():
        assert got.per_matrix[t][i] == pytest.approx(v * scale, abs=1e-12)


def test_prune_model_reaches_each_matrix_target():
    model = tiny_model("llama", seed=3)
    sizes = model_matrix_sizes(model)
    types = list(sizes)
    targets = {t: [0.2 + 0.1 * k, 0.6 - 0.05 * k] for k, t in enumerate(types)}
    s = MatrixSparsities(targets, sizes)
    report = prune_model(model, calib(4, 16), s, "wanda", batch_size=2, progress=False)
    for row in report["matrices"]:
        want = targets[row["matrix"]][row["layer"]]
        cols = row["shape"][1]
        assert row["target"] == want
        assert row["achieved"] == pytest.approx(math.floor(cols * want + 0.5) / cols, abs=1e-9)
    assert report["target_sparsity"] == pytest.approx(weighted_mean(targets, sizes))


def test_a_per_layer_allocation_expanded_prunes_the_same_masks():
    seqs = calib(5, 16)
    a, b = tiny_model("qwen2", seed=2), tiny_model("qwen2", seed=2)
    prune_model(a, seqs, [0.3, 0.6], "wanda", batch_size=2, progress=False)
    prune_model(b, seqs, expand([0.3, 0.6], model_matrix_sizes(b)), "wanda", batch_size=2,
                progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_cli_allocate_and_prune_per_matrix(tmp_path, capsys):
    model_dir = save_tiny_lm(tmp_path / "tiny")
    data = tmp_path / "texts.txt"
    data.write_text("".join(f"line {i} of some calibration text here\n" for i in range(40)))
    prof = tmp_path / "prof"
    assert main(["profile", "--model", model_dir, "--dataset", str(data), "--samples", "4",
                 "--seq-len", "16", "--out", str(prof), "--quiet", "--no-cache"]) == 0
    rec = tmp_path / "alloc.json"
    assert main(["allocate", "--sparsity", "0.5", "--method", "activation-matrix", "--profile",
                 str(prof), "--json", str(rec), "--quiet"]) == 0
    out = capsys.readouterr().out
    info = json.loads(rec.read_text())
    from transformers import AutoModelForCausalLM

    sizes = model_matrix_sizes(AutoModelForCausalLM.from_pretrained(model_dir))
    assert weighted_mean(info["matrix_sparsities"], sizes) == pytest.approx(0.5, abs=1e-9)
    assert len(set(x for v in info["matrix_sparsities"].values() for x in v)) > 1
    header = next(x for x in out.splitlines() if x.startswith("layer  S_i")).split()
    assert header[2:] == list(sizes)  # one column per matrix type
    saved = tmp_path / "pruned"
    assert main(["prune", "--model", model_dir, "--sparsity", "0.5", "--pruner", "magnitude",
                 "--allocation", "activation-matrix", "--profile", str(prof), "--save",
                 str(saved), "--quiet", "--device", "cpu"]) == 0
    pr = json.loads((saved / "actpat_prune.json").read_text())
    for t, v in info["matrix_sparsities"].items():
        assert pr["allocation"]["matrix_sparsities"][t] == pytest.approx(v, abs=1e-12)
    assert len(pr["matrices"]) == sum(len(v) for v in sizes.values())
    for row in pr["matrices"]:
        want = info["matrix_sparsities"][row["matrix"]][row["layer"]]
        assert row["target"] == pytest.approx(want, abs=1e-12)
    assert pr["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)


def test_search_matrix_keeps_the_mean_and_does_not_get_worse():
    from actpat.sparsity.allocation_search import MaskScorer, SearchSettings
    from actpat.sparsity.per_matrix import flatten

    seqs, held = calib(6, 20), calib(4, 20, seed=5)
    model = tiny_model("llama", seed=6)
    sizes = model_matrix_sizes(model)
    counts = {t: [30 + 7 * k, 10 + k] for k, t in enumerate(sizes)}
    info = {}
    got = allocate("search-matrix", 0.6, model=model, calib_inputs=seqs, held_inputs=held,
                   matrix_counts=counts, matrix_sizes=sizes, batch_size=3, info=info,
                   search=SearchSettings(budget=10, seed=1, step=0.05))
    assert isinstance(got, MatrixSparsities)
    assert weighted_mean(got.per_matrix, sizes) == pytest.approx(0.6, abs=1e-9)
    assert info["search"]["score"] <= info["search"]["start_score"]
    assert len(info["search"]["start"]) == sum(len(v) for v in sizes.values())
    # the scorer at a per-matrix candidate equal to a per-layer one gives the same score
    with MaskScorer(model, seqs, held, [0.5, 0.5], batch_size=3) as scorer:
        per_layer = scorer([0.4, 0.7])
        assert scorer(flatten(expand([0.4, 0.7], sizes).per_matrix)) == per_layer
        with pytest.raises(UserError, match="per layer or per matrix"):
            scorer([0.5] * 3)
    again = allocate("search-matrix", 0.6, model=model, calib_inputs=seqs, held_inputs=held,
                     matrix_counts=counts, matrix_sizes=sizes, batch_size=3,
                     search=SearchSettings(budget=10, seed=1, step=0.05))
    assert again.per_matrix == got.per_matrix  # reproducible from its seed
