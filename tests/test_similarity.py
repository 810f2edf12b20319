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
from helpers import CharTok, PadTok, fail
from reference import abs_cosine, autograd_activations, layer_cosines, matrix_cosines
from tiny import ARCHS, VOCAB, tiny_model


def _lm(arch, seed=0):
    return LoadedModel(tiny_model(arch, seed), PadTok(), arch, {"spec": arch})


def _seqs(n, seed=0, lo=3, hi=12):
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_pair_sim_matches_plain_autograd(arch):
    """Each pair's per-layer (and per-matrix) similarity equals the cosine of the two samples'
    activation maps from plain per-sample autograd (reference.py)."""
    lm = _lm(arch)
    seqs = _seqs(6, seed=1)
    pairs = [(seqs[0], seqs[1]), (seqs[2], seqs[3]), (seqs[4], seqs[5])]
    got = pair_similarity(lm, pairs, pairs_per_batch=2)  # padding and batch neighbours included
    assert got.layer.shape == (3, 2)
    for k, (a, b) in enumerate(pairs):
        ma, mb = autograd_activations(lm.model, [a]), autograd_activations(lm.model, [b])
        np.testing.assert_allclose(got.layer[k], layer_cosines(lm.model, ma, mb), rtol=0,
                                   atol=1e-6)
        want = matrix_cosines(lm.model, ma, mb)
        assert set(got.matrix) == set(want)
        for t, v in got.matrix.items():
            np.testing.assert_allclose(v[k], want[t], rtol=0, atol=1e-6)


def test_saved_single_sample_profiles_give_the_same_similarity(tmp_path):
    """profile_layer_similarity of two saved one-sample profiles == the pair similarity."""
    lm = _lm("llama")
    a, b = _seqs(2, seed=7)
    profs = []
    for k, s in enumerate((a, b)):
        compute_profile(lm, [s], batch_size=1, progress=False).save(tmp_path / f"p{k}")
        profs.append(Profile.load(tmp_path / f"p{k}"))
    np.testing.assert_allclose(profile_layer_similarity(*profs),
                               pair_similarity(lm, [(a, b)]).layer[0], rtol=0, atol=1e-6)


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
    # by hand: (0.5 + 2 + 0 + 3) / (sqrt(14) * sqrt(18.25))
    assert abs(cosine(a, b) - 5.5 / (14 ** 0.5 * 18.25 ** 0.5)) < 1e-12
    assert abs(abs_cosine(a, b) - 5.5 / (14 ** 0.5 * 18.25 ** 0.5)) < 1e-12
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


def test_memory_flat_in_pairs(monkeypatch):
    """What the sink holds while scoring (B x B Gram matrices per layer and per matrix type)
    does not grow with the number of pairs: 2, 6 and 12 pairs, 2 pairs per batch."""
    import actpat.analysis.similarity as S

    real_add, held = S.GramSink.add, []

    def add(self, matrix, acts):
        real_add(self, matrix, acts)
        held.append(sum(t.numel() for t in (*self.layer.values(), *self.matrix.values())))

    monkeypatch.setattr(S.GramSink, "add", add)
    lm = _lm("llama")
    peaks = {}
    for n in (2, 6, 12):
        held.clear()
        seqs = _seqs(2 * n, seed=n)
        res = pair_similarity(lm, list(zip(seqs[:n], seqs[n:])), pairs_per_batch=2)
        assert res.layer.shape == (n, 2)
        assert len(held) == 14 * ((n + 1) // 2)  # every matrix of every batch went through it
        peaks[n] = max(held)
    # 2 layers + 7 types x 2 layers, each a 4 x 4 Gram matrix: the same for every n
    assert peaks == {2: (2 + 14) * 16, 6: (2 + 14) * 16, 12: (2 + 14) * 16}


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
    assert "at least two" in fail(capsys, "relate", runs[0], "--json", out)  # one run: no matrix
    assert "5:9" in fail(capsys, "relate", *runs, "--layers", "5:9")


def test_similarity_run_within_cross_and_all(tmp_path):
    from actpat.analysis.similarity import similarity_run
    from actpat.outputs.artifacts import write_similarity

    files = []
    for k in range(3):
        f = tmp_path / f"d{k}.txt"
        f.write_text("".join(f"text {k} number {i} " * (1 + i % 3) + "\n" for i in range(6)))
        files.append(str(f))
    lm = LoadedModel(tiny_model("llama"), CharTok(VOCAB, offset=1), "llama", {"spec": "tiny"})
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
    a = autograd_activations(smollm2.model, [seqs["boolq"][0]])
    b = autograd_activations(smollm2.model, [seqs["c4"][0]])
    want = layer_cosines(smollm2.model, a, b)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)
    assert (out / "similarity_boxes.png").stat().st_size > 0
