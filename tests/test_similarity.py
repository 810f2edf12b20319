"""Pair similarity computed while scoring, against saved single-sample profiles; relate."""

import json
import random

import numpy as np
import pytest
import torch

from actpat.models.loading import LoadedModel
from actpat.activation.profiling import Profile, compute_profile
from actpat.analysis.similarity import (cosine, dataset_similarity, group_similarity, pair_similarity,
                               profile_layer_similarity, relate_bands)
from tiny import ARCHS, VOCAB, tiny_model


class _Tok:
    pad_token_id = 0


def _lm(arch, seed=0):
    return LoadedModel(tiny_model(arch, seed), _Tok(), arch, {"spec": arch})


def _seqs(n, seed=0, lo=3, hi=12):
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _direct(lm, a, b, tmp_path):
    """Per-layer sim from two saved single-sample profiles (the mean of one sample is itself)."""
    profs = []
    for k, s in enumerate((a, b)):
        compute_profile(lm, [s], batch_size=1, progress=False).save(tmp_path / f"p{k}")
        profs.append(Profile.load(tmp_path / f"p{k}"))
    per_layer = profile_layer_similarity(*profs)
    return per_layer, profs


@pytest.mark.parametrize("arch", ARCHS)
def test_pair_sim_matches_saved_profiles(arch, tmp_path):
    lm = _lm(arch)
    seqs = _seqs(6, seed=1)
    pairs = [(seqs[0], seqs[1]), (seqs[2], seqs[3]), (seqs[4], seqs[5])]
    got = pair_similarity(lm, pairs, pairs_per_batch=2)  # padding and batch neighbours included
    assert got.layer.shape == (3, 2)
    for k, (a, b) in enumerate(pairs):
        want, profs = _direct(lm, a, b, tmp_path / str(k))
        np.testing.assert_allclose(got.layer[k], want, rtol=0, atol=1e-6)
        # per matrix type: the same cosine on that matrix alone
        for t, v in got.matrix.items():
            for i in range(2):
                name = next(n for n in profs[0].maps
                            if profs[0].layers[n] == i and profs[0].matrices[n] == t)
                assert abs(v[k, i] - cosine(profs[0].maps[name], profs[1].maps[name])) < 1e-6


def test_symmetric_identity_and_range():
    lm = _lm("llama")
    seqs = _seqs(8, seed=2)
    ab = pair_similarity(lm, [(seqs[0], seqs[1]), (seqs[2], seqs[3])])
    ba = pair_similarity(lm, [(seqs[1], seqs[0]), (seqs[3], seqs[2])])
    np.testing.assert_allclose(ab.layer, ba.layer, atol=1e-12)
    same = pair_similarity(lm, [(s, s) for s in seqs[:4]])
    np.testing.assert_allclose(same.layer, 1.0, atol=1e-9)
    for t in same.matrix.values():
        np.testing.assert_allclose(t, 1.0, atol=1e-9)
    allp = pair_similarity(lm, list(zip(seqs[:4], seqs[4:])), pairs_per_batch=3)
    assert ((allp.layer >= 0) & (allp.layer <= 1 + 1e-12)).all()
    assert (allp.layer < 1 - 1e-6).all()  # different inputs are not identical


def test_cosine_definition():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    b = torch.tensor([0.5, 1.0, 4.0, -1.0], dtype=torch.float64)
    want = (abs(a) * abs(b)).sum() / (a.norm() * b.norm())
    assert abs(cosine(a, b) - float(want)) < 1e-12
    assert np.isnan(cosine(torch.zeros(3), torch.ones(3)))


def test_group_similarity_equals_pairwise():
    """One joint pass gives the same within and cross sims as separate pair runs."""
    lm = _lm("qwen2")
    groups = {"x": _seqs(4, 3), "y": _seqs(4, 4), "z": _seqs(4, 5)}
    res = group_similarity(lm, groups)
    for n, seqs in groups.items():
        want = pair_similarity(lm, [(seqs[0], seqs[2]), (seqs[1], seqs[3])])
        np.testing.assert_allclose(res.within[n].layer, want.layer, atol=1e-6)
    want = pair_similarity(lm, [(groups["x"][0], groups["z"][0]), (groups["x"][1], groups["z"][1])])
    np.testing.assert_allclose(res.cross[("x", "z")].layer, want.layer, atol=1e-6)
    assert res.samples_scored == 12


def test_memory_flat_in_pairs():
    """The sink keeps only a B x B Gram matrix per layer, whatever the number of pairs."""
    from actpat.activation.metric import pad_batch, score_batch
    from actpat.analysis.similarity import GramSink

    lm = _lm("llama")
    sink = GramSink()
    seqs = _seqs(4)
    ids, mask = pad_batch(seqs, 0)
    score_batch(lm.model, ids, mask, [sink])
    g = sink.pop()
    assert g.layer.shape == (2, 4, 4) and not sink.layer and not sink.matrix


def test_dataset_similarity_and_bands(tmp_path):
    lm = _lm("llama")
    profs = [compute_profile(lm, _seqs(3, s), progress=False) for s in range(3)]
    m = dataset_similarity(profs, ["a", "b", "c"], {"all": (0, 2), "l1": (1, 2)})
    assert m.per_layer.shape == (2, 3, 3)
    assert abs(m.per_layer[1, 0, 2] - cosine(profs[0].layer_vector(1), profs[2].layer_vector(1))) \
        < 1e-12
    np.testing.assert_allclose(m.band("all"), m.per_layer.mean(0))
    rank = m.ranking("a", "l1")
    assert [r[0] for r in rank] == sorted(["b", "c"], key=lambda n: -m.per_layer[1, 0, "abc".index(n)])
    assert relate_bands(30) == {"all": (0, 30), "shallow": (1, 11), "deep": (15, 30)}
    assert relate_bands(32) == {"all": (0, 32), "shallow": (1, 12), "deep": (16, 32)}


def test_relate_command(tmp_path, capsys):
    from actpat.cli import main

    lm = _lm("llama")
    runs = []
    for s, name in enumerate(["c4", "boolq", "hellaswag"]):
        p = compute_profile(lm, _seqs(3, s), progress=False, meta={"dataset": name})
        p.save(tmp_path / name)
        runs.append(str(tmp_path / name))
    out = tmp_path / "rel.json"
    rc = main(["relate", *runs, "--json", str(out), "--plot", str(tmp_path / "h.png"),
               "--layers", "1:2"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["datasets"] == ["c4", "boolq", "hellaswag"]
    assert set(data["bands"]) >= {"all", "shallow", "deep", "custom"}
    assert data["reference"] == "c4" and len(data["ranking"]["deep"]) == 2
    assert (tmp_path / "h.png").stat().st_size > 0
    assert main(["relate", runs[0], "--json", str(out)]) == 2  # one run is no matrix
    assert main(["relate", *runs, "--layers", "5:9"]) == 2


class _CharTok:
    """Characters to ids, enough for ``sample_sequences`` on local files."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}


def test_similarity_run_within_cross_and_all(tmp_path):
    from actpat.analysis.similarity import similarity_run
    from actpat.outputs.artifacts import write_similarity

    files = []
    for k in range(3):
        f = tmp_path / f"d{k}.txt"
        f.write_text("".join(f"text {k} number {i} " * (1 + i % 3) + "\n" for i in range(6)))
        files.append(str(f))
    lm = LoadedModel(tiny_model("llama"), _CharTok(), "llama", {"spec": "tiny"})
    one = similarity_run(lm, files[:1], pairs=2, seq_len=16, progress=False)
    (c,) = one["comparisons"]
    assert c["kind"] == "within" and c["pairs"] == [[0, 2], [1, 3]]
    assert np.array(c["per_pair"]).shape == (2, 2)
    two = similarity_run(lm, files[:2], pairs=3, seq_len=16, progress=False)
    (c,) = two["comparisons"]
    assert c["kind"] == "cross" and c["pairs"] == [[0, 0], [1, 1], [2, 2]]
    three = similarity_run(lm, files, pairs=2, seq_len=16, progress=False)
    kinds = [(c["kind"], tuple(c["datasets"])) for c in three["comparisons"]]
    assert kinds[:3] == [("within", (f, f)) for f in files] and len(kinds) == 6
    # the joint pass gives the same within-domain numbers as the one-dataset run
    np.testing.assert_allclose(three["comparisons"][0]["per_pair"],
                               one["comparisons"][0]["per_pair"], atol=1e-6)
    write_similarity(three, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "similarity.json").read_text())
    assert saved["num_layers"] == 2
    assert set(saved["matrix_types"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert (tmp_path / "run" / "similarity_boxes.png").exists()


def test_similarity_end_to_end_smollm2(tmp_path, smollm2, data_dir):
    """`actpat similarity` on SmolLM2 with local boolq x c4: each pair's per-layer similarity
    equals the cosine of plain-autograd activations of the two samples, scored one at a time."""
    from actpat.cli import main
    from actpat.data.datasets import sample_sequences
    from actpat.models.loading import scored_matrices
    from reference import autograd_activations

    out = tmp_path / "run"
    rc = main(["similarity", "--model", "smollm2-135m", "--dataset", "boolq", "--dataset", "c4",
               "--pairs", "2", "--seq-len", "24", "--data-dir", str(data_dir), "--quiet",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "similarity.json").read_text())
    (c,) = res["comparisons"]
    assert c["kind"] == "cross" and c["datasets"] == ["boolq", "c4"]
    assert res["num_layers"] == 30 and str(data_dir) in res["datasets"]["boolq"]["source"]
    got = np.array(c["per_pair"])
    assert got.shape == (2, 30) and (got > 0).all() and (got < 1).all()
    seqs = {d: sample_sequences(smollm2.tokenizer, d, 2, 24, 0, None, str(data_dir)).sequences
            for d in ("boolq", "c4")}
    layer_of = {m.name: m.layer for m in scored_matrices(smollm2.model)}
    a = autograd_activations(smollm2.model, [seqs["boolq"][0]])
    b = autograd_activations(smollm2.model, [seqs["c4"][0]])
    want = [cosine(torch.cat([a[n].flatten() for n in a if layer_of[n] == i]),
                   torch.cat([b[n].flatten() for n in b if layer_of[n] == i]))
            for i in range(30)]
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)
    assert (out / "similarity_boxes.png").stat().st_size > 0
