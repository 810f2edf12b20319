"""The layer-streamed engine gives the in-memory results: profile, prune, perplexity, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import actpat.activation.streaming as streaming
from actpat.activation.profiling import Profile, compute_profile
from actpat.activation.streaming import profile_streamed
from actpat.evaluation.evaluate import Corpus, perplexity
from actpat.evaluation.streamed import perplexity_streamed
from actpat.models.loading import load_model
from actpat.models.streamed import open_streamed
from actpat.sparsity.layerwise import prune_model
from actpat.sparsity.streamed import prune_streamed
from helpers import tiny_task_data
from tiny import ARCHS
from tinylm import save_tiny_lm

ROOT = Path(__file__).resolve().parents[1]
PROSE = ROOT / "actpat" / "probes" / "prose.txt"


def _seqs(n, seed=0, lo=4, hi=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 97, (int(torch.randint(lo, hi, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def _rel_frobenius(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)) for k in a)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-models")
    return {arch: save_tiny_lm(root / arch, arch) for arch in ARCHS}


def _streamed_maps(model_dir, seqs, run, batch, objective="max-logit", group=None):
    sm = open_streamed(model_dir)
    prof = profile_streamed(sm, seqs, run, "key", batch, objective, progress=False, group=group)
    prof.save(run)
    return Profile.load(run)


# --------------------------------------------------------------------------- profile


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_profile_equals_in_memory(dirs, tmp_path, arch):
    seqs = _seqs(7)  # unequal lengths: padded batches, a last batch of 1
    ref = compute_profile(load_model(dirs[arch]), seqs, 3, progress=False)
    got = _streamed_maps(dirs[arch], seqs, tmp_path / "run", 3)  # one walk for 3 batches
    assert _rel_frobenius(got.maps, ref.maps) <= 1e-6
    got = _streamed_maps(dirs[arch], seqs, tmp_path / "run1", 3, group=1)  # a walk per batch
    assert _rel_frobenius(got.maps, ref.maps) <= 1e-6
    assert got.layers == ref.layers and got.matrices == ref.matrices
    assert not (tmp_path / "run" / "stream").exists()  # the scratch state is gone


def test_streamed_profile_nll_objective(dirs, tmp_path):
    seqs = _seqs(5, seed=3)
    ref = compute_profile(load_model(dirs["llama"]), seqs, 2, objective="nll", progress=False)
    got = _streamed_maps(dirs["llama"], seqs, tmp_path / "run", 2, objective="nll")
    assert _rel_frobenius(got.maps, ref.maps) <= 1e-6


class _Killed(Exception):
    pass


@pytest.mark.parametrize("where,group", [("walk-down", 1), ("walk-down", 2), ("assembly", 2)])
def test_resume_after_interruption_is_bit_identical(dirs, tmp_path, monkeypatch, where, group):
    """A run stopped part-way (every write is an atomic rename, so a kill -9 leaves the same
    state as this exception) and run again gives exactly the uninterrupted profile."""
    seqs = _seqs(8, seed=5)
    whole = _streamed_maps(dirs["qwen2"], seqs, tmp_path / "whole", 3, group=group)
    run = tmp_path / "resumed"
    calls = {"n": 0}
    if where == "walk-down":  # stop inside the second walk down, after one layer
        real = streaming._Store.save_acc

        def save_acc(self, i, sums, cursor):
            calls["n"] += 1
            if calls["n"] == 3:
                raise _Killed
            real(self, i, sums, cursor)

        monkeypatch.setattr(streaming._Store, "save_acc", save_acc)
    else:  # stop after the first layer's maps were written into profile.safetensors.tmp
        real_unlink = Path.unlink

        def unlink(self, *a, **k):
            real_unlink(self, *a, **k)
            if self.name.startswith("acc-"):
                raise _Killed

        monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(_Killed):
        _streamed_maps(dirs["qwen2"], seqs, run, 3, group=group)
    monkeypatch.undo()
    assert (run / "stream" / "state.json").exists()
    resumed = _streamed_maps(dirs["qwen2"], seqs, run, 3, group=group)
    assert resumed.meta["resumed_at_sample"] == (3 * group if where == "walk-down" else 8)
    for k in whole.maps:
        assert torch.equal(resumed.maps[k], whole.maps[k]), k


def test_state_of_another_profile_is_refused(dirs, tmp_path):
    from actpat.errors import UserError

    seqs = _seqs(4)
    (tmp_path / "run" / "stream").mkdir(parents=True)
    (tmp_path / "run" / "stream" / "state.json").write_text(json.dumps({"key": "other"}))
    with pytest.raises(UserError, match="different profile"):
        profile_streamed(open_streamed(dirs["llama"]), seqs, tmp_path / "run", "key", 2,
                         progress=False)


# --------------------------------------------------------------------------- prune, perplexity


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("pruner,pattern", [("wanda", "unstructured"),
                                            ("sparsegpt", "unstructured"),
                                            ("wanda", "2:4"), ("magnitude", "unstructured")])
def test_streamed_prune_equals_in_memory(dirs, tmp_path, arch, pruner, pattern):
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(2, 97, (6, 16), generator=g).tolist()
    sparsities = [0.5, 0.5] if pattern == "2:4" else [0.6, 0.3]
    lm = load_model(dirs[arch])
    ref = prune_model(lm.model, calib, sparsities, pruner, pattern, batch_size=4, progress=False)
    got = prune_streamed(open_streamed(dirs[arch]), calib, sparsities, tmp_path / "p", pruner,
                         pattern, batch_size=4, progress=False)
    assert [m["achieved"] for m in got["matrices"]] == [m["achieved"] for m in ref["matrices"]]
    pruned = load_model(str(tmp_path / "p")).model.state_dict()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(pruned[k], v), k  # same masks, same SparseGPT updates
    corpus = Corpus("rand", torch.randint(2, 97, (16 * 9 + 5,), generator=g), "random ids")
    a = perplexity(lm.model, corpus, 16, limit=7, batch_size=3)
    b = perplexity_streamed(open_streamed(str(tmp_path / "p")), corpus, 16, limit=7,
                            batch_size=3, group=6)
    assert a["ppl"] == b["ppl"] and a["windows"] == b["windows"] == 7


@pytest.mark.parametrize("group", [1, 4, 64])
def test_streamed_perplexity_equals_in_memory(dirs, group):
    g = torch.Generator().manual_seed(2)
    corpus = Corpus("rand", torch.randint(2, 97, (20 * 11,), generator=g), "random ids")
    a = perplexity(load_model(dirs["phi3"]).model, corpus, 20, batch_size=2)
    b = perplexity_streamed(open_streamed(dirs["phi3"]), corpus, 20, batch_size=2, group=group)
    assert a["ppl"] == b["ppl"] and b["windows"] == 11
    assert b["streamed"]["layer_loads"] == 2 * -(-11 // max(2, group // 2 * 2))


def test_layers_are_freed_after_use(dirs):
    sm = open_streamed(dirs["llama"])
    assert all(p.device.type == "meta" for p in sm.layers.parameters())
    sm.load_layer(1)
    assert all(p.device.type == "cpu" for p in sm.layers[1].parameters())
    sm.free_layer(1)
    assert all(p.device.type == "meta" for p in sm.layers.parameters())
    assert sm.model.get_input_embeddings().weight.device.type == "cpu"


# --------------------------------------------------------------------------- commands


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "actpat", *args], capture_output=True, text=True,
                       cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_commands_stream_and_budget_switch(dirs, tmp_path):
    model = dirs["llama"]
    common = ["--dataset", str(PROSE), "--samples", "5", "--seq-len", "24", "--quiet",
              "--no-cache", "--device", "cpu"]
    _cli("profile", "--model", model, *common, "--out", str(tmp_path / "mem"))
    _cli("profile", "--model", model, *common, "--out", str(tmp_path / "flag"), "--stream-layers")
    _cli("profile", "--model", model, *common, "--out", str(tmp_path / "budget"),
         "--max-memory", "100KB")
    mem, flag, budget = (Profile.load(tmp_path / d) for d in ("mem", "flag", "budget"))
    assert _rel_frobenius(flag.maps, mem.maps) <= 1e-6
    assert "streamed" in budget.meta and "streamed" not in mem.meta
    for k in flag.maps:
        assert torch.equal(flag.maps[k], budget.maps[k])
    prune = ["--model", model, "--sparsity", "0.5", "--calibration", str(PROSE),
             "--calibration-samples", "4", "--seq-len", "16", "--exclude-first", "0",
             "--quiet", "--device", "cpu"]
    _cli("prune", *prune, "--save", str(tmp_path / "p-mem"))
    _cli("prune", *prune, "--save", str(tmp_path / "p-flag"), "--stream-layers")
    _cli("prune", *prune, "--save", str(tmp_path / "p-flag"), "--stream-layers")  # re-run: owned
    a = load_model(str(tmp_path / "p-mem")).model.state_dict()
    b = load_model(str(tmp_path / "p-flag")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "p-flag" / "actpat_prune.json").read_text())
    assert record["streamed"]["layer_loads"] == 2 and record["achieved_sparsity"] > 0.45


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_zero_shot_equals_in_memory(tmp_path, arch):
    """Same items, same log-likelihoods (float32 rounding of other batch shapes), same acc."""
    from actpat.evaluation.evaluate import zero_shot
    from actpat.evaluation.streamed import zero_shot_streamed

    data = tiny_task_data(tmp_path / "data")
    d = save_tiny_lm(tmp_path / arch, arch)
    lm = load_model(d)
    ref = zero_shot(lm.model, lm.tokenizer, ["piqa", "siqa"], limit=5, batch_size=3,
                    data_dir=data, log_samples=True, progress=False)
    sm = open_streamed(d)
    got = zero_shot_streamed(sm, ["piqa", "siqa"], limit=5, batch_size=2, data_dir=data,
                             group=4, log_samples=True)
    for t in ("piqa", "siqa"):
        a = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in ref[t]["samples"]}
        b = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in got[t]["samples"]}
        assert list(a) == list(b) and len(a) == 5
        for k in a:
            assert b[k] == pytest.approx(a[k], abs=1e-5), (t, k)
        for key in ("acc", "acc_norm", "n", "pred_share", "dtype"):
            assert got[t][key] == ref[t][key], (t, key)
        # 5 piqa items x 2 choices + 5 siqa x 3 = 25 requests, groups of 4: 7 walks
        assert got[t]["streamed"]["layer_loads"] == 7 * sm.num_layers


def test_eval_streams_zero_shot(dirs, tmp_path):
    data = tiny_task_data(tmp_path / "data")
    out = tmp_path / "e.json"
    _cli("eval", "--model", dirs["llama"], "--tasks", "wikitext2,piqa", "--limit", "4",
         "--seq-len", "16", "--data-dir", data, "--stream-layers", "--device", "cpu",
         "--quiet", "--json", str(out))
    mem = tmp_path / "m.json"
    _cli("eval", "--model", dirs["llama"], "--tasks", "wikitext2,piqa", "--limit", "4",
         "--seq-len", "16", "--data-dir", data, "--device", "cpu", "--quiet", "--json", str(mem))
    a, b = json.loads(out.read_text()), json.loads(mem.read_text())
    assert list(a) == ["wikitext2", "piqa"] and a["piqa"]["n"] == 4
    assert a["piqa"]["acc"] == b["piqa"]["acc"] and "streamed" in a["piqa"]
    assert a["wikitext2"]["ppl"] == pytest.approx(b["wikitext2"]["ppl"], rel=1e-6)


def test_streamed_generation_tasks_are_refused(dirs):
    from actpat.errors import UserError
    from actpat.evaluation.streamed import streamed_lm

    lm = streamed_lm(open_streamed(dirs["llama"]))
    with pytest.raises(UserError, match="not streamed"):
        lm.generate_until([])


# ------------------------------------------------------------------ pairs (similarity, sts)


def _pairs(n, seed=1):
    seqs = _seqs(2 * n, seed, 3, 15)
    return [(seqs[2 * k], seqs[2 * k + 1]) for k in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_pair_similarity_equals_in_memory(dirs, arch):
    """Per-layer and per-matrix pair similarities, and the hidden-state baselines of ``sts``,
    from the streamed engine equal the in-memory ones (7 pairs of unequal lengths: padded
    batches, a last batch of one pair)."""
    import numpy as np

    from actpat.analysis.similarity import pair_similarity
    from actpat.analysis.sts import hidden_state_similarity, hidden_state_similarity_streamed

    pairs = _pairs(7)
    lm, sm = load_model(dirs[arch]), open_streamed(dirs[arch])
    ref, got = pair_similarity(lm, pairs, 2), pair_similarity(sm, pairs, 2)
    assert sm.layers_loaded == 2 * sm.num_layers  # 4 batches in one walk: forward + walk down
    assert got.layer.shape == ref.layer.shape == (7, sm.num_layers)
    np.testing.assert_allclose(got.layer, ref.layer, rtol=0, atol=1e-6)
    assert list(got.matrix) == list(ref.matrix)
    for t in ref.matrix:
        np.testing.assert_allclose(got.matrix[t], ref.matrix[t], rtol=0, atol=1e-6)
    a = hidden_state_similarity(lm, pairs, 4)
    b = hidden_state_similarity_streamed(sm, pairs, 4, group=2)
    for k in ("hidden-mean", "hidden-last"):
        assert b[k].shape == a[k].shape == (7, sm.num_layers)
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6)


def test_similarity_and_sts_commands_stream(dirs, tmp_path):
    model = dirs["llama"]
    sim = ["similarity", "--model", model, "--dataset", str(PROSE), "--pairs", "3",
           "--seq-len", "20", "--quiet", "--device", "cpu"]
    _cli(*sim, "--out", str(tmp_path / "s-mem"))
    _cli(*sim, "--out", str(tmp_path / "s-str"), "--max-memory", "1KB")  # budget -> streamed
    a = json.loads((tmp_path / "s-mem" / "similarity.json").read_text())
    b = json.loads((tmp_path / "s-str" / "similarity.json").read_text())
    assert b["model"].get("streamed") and not a["model"].get("streamed")
    got, want = (sum(r["comparisons"][0]["per_pair"], []) for r in (b, a))
    assert len(got) == 3 * 2 and got == pytest.approx(want, abs=1e-6)
    rows = [("a cat sat", "the cat sat", 4.0), ("dogs run", "stocks fell", 0.5),
            ("we eat", "we eat", 5.0), ("red car", "blue sky", 1.0)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"s1": x, "s2": y, "gold": g}) + "\n" for x, y, g in rows))
    sts = ["sts", "--model", model, "--dataset", str(f), "--pair-fields", "s1,s2,gold",
           "--samples", "0", "--bootstrap", "100", "--quiet", "--device", "cpu"]
    _cli(*sts, "--out", str(tmp_path / "t-mem"))
    _cli(*sts, "--out", str(tmp_path / "t-str"), "--stream-layers")
    a = json.loads((tmp_path / "t-mem" / "sts.json").read_text())
    b = json.loads((tmp_path / "t-str" / "sts.json").read_text())
    got, want = (sum(r["pair_similarity"], []) for r in (b, a))
    assert len(got) == 4 * 2 and got == pytest.approx(want, abs=1e-6)
    assert b["per_layer_spearman"] == pytest.approx(a["per_layer_spearman"], abs=1e-6)
    for k in a["baselines"]:
        assert json.dumps(b["baselines"][k]) == json.dumps(a["baselines"][k])


def test_stream_needs_a_local_checkpoint(tmp_path):
    from actpat.errors import UserError

    with pytest.raises(UserError, match="safetensors"):
        open_streamed(str(tmp_path))


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_streamed_profile_equals_in_memory_smollm2(smollm2, tmp_path):
    from actpat.data.datasets import sample_sequences

    seqs = sample_sequences(smollm2.tokenizer, str(PROSE), 6, 64, 0).sequences
    ref = compute_profile(smollm2, seqs, 3, progress=False)
    sm = open_streamed("smollm2-135m")
    prof = profile_streamed(sm, seqs, tmp_path, "key", 3, progress=False)
    prof.save(tmp_path)
    got = Profile.load(tmp_path)
    assert _rel_frobenius(got.maps, ref.maps) <= 1e-6
