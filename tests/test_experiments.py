"""Experiments: configurations run on a tiny model, results written per configuration, resume."""

import json

import pytest
from tinylm import save_tiny_lm

from actpat.cli import main
from actpat.experiments.plan import (Config, Settings, calibration_configs, result_path,
                                     table1_configs)
from actpat.experiments.runner import run_plan
from actpat.experiments.tables import table_markdown
from helpers import fail, interrupted, ok, raise_on_call


def _decode(ids):
    from tinylm import CHARS, SPECIAL

    table = SPECIAL + list(CHARS)
    return "".join(table[i] for i in ids)


def _data(root):
    texts = [f"Document {i} talks about cats, dogs and the weather in town {i}." for i in range(30)]
    (root / "c4").mkdir(parents=True)
    for split in ("train", "validation"):
        (root / "c4" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t + (" " + split) * 3}) + "\n" for t in texts))
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "test.txt").write_text(" \n = T = \n \n" + " A line of text here .\n" * 20)
    return str(root)


@pytest.fixture()
def tiny_run(tmp_path):
    settings = Settings(model=save_tiny_lm(tmp_path / "m"), data_dir=_data(tmp_path / "data"),
                        seq_len=16, windows=3, calib_samples=4, calib_seq_len=16,
                        profile_samples=4, batch_size=2)
    plan = [Config(None), Config("wanda", "uniform", 0.5), Config("wanda", "activation", 0.5),
            Config("magnitude", "uniform", 0.6)]
    return settings, plan, tmp_path / "run"


def test_plan_runs_then_resumes_without_recomputing(tiny_run):
    settings, plan, out = tiny_run
    logs = []
    first = run_plan(settings, out, plan, log=logs.append)
    assert [r["name"] for r in first] == [c.name for c in plan]
    dense, uni, act, mag = first
    assert dense["eval"]["wikitext2"]["windows"] == 3 and dense["eval"]["c4"]["seq_len"] == 16
    assert "prune" not in dense
    for r in (uni, act):
        assert r["prune"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert r["calibration"]["source"].endswith("train.jsonl")  # never the evaluated split
        assert r["eval"]["wikitext2"]["ppl"] > 1
    assert act["allocation"]["counts"]["gamma_rule"] == "quantile=0.1"
    assert sum(act["allocation"]["sparsities"]) / len(act["allocation"]["sparsities"]) \
        == pytest.approx(0.5, abs=1e-6)
    assert act["allocation"]["sparsities"] != uni["allocation"]["sparsities"]
    assert mag["prune"]["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert (out / "counts-profile" / "profile.safetensors").exists()

    # the run's summary: every record, the markdown table, the S_i plot
    assert len(json.loads((out / "results.json").read_text())) == len(plan)
    assert "| 0.5 | wanda | activation |" in (out / "table.md").read_text()
    assert (out / "sparsities.png").stat().st_size > 0

    mtimes = {c.name: result_path(out, c).stat().st_mtime_ns for c in plan}
    logs.clear()
    second = run_plan(settings, out, plan, log=logs.append)
    assert all("skipped" in line for line in logs) and len(logs) == len(plan)
    assert {c.name: result_path(out, c).stat().st_mtime_ns for c in plan} == mtimes
    assert second == json.loads(json.dumps(first, default=str))  # as read back from disk

    table = table_markdown(second)
    assert "| 0.5 | wanda | activation |" in table and "| - | dense | - |" in table

    # a killed run: the last result missing -> only it is recomputed, to the same numbers
    result_path(out, plan[1]).unlink()
    logs.clear()
    third = run_plan(settings, out, plan, log=logs.append)
    assert sum("skipped" in line for line in logs) == len(plan) - 1
    for task in ("wikitext2", "c4"):
        assert third[1]["eval"][task]["ppl"] == pytest.approx(first[1]["eval"][task]["ppl"],
                                                              rel=1e-6)

    # resuming with other sizes would mix two settings in one table: refused, nothing lost
    from dataclasses import replace

    from actpat.errors import UserError

    with pytest.raises(UserError, match="windows=3"):
        run_plan(replace(settings, windows=5), out, plan, log=logs.append)
    assert result_path(out, plan[0]).exists()
    assert json.loads((out / "settings.json").read_text())["windows"] == 3
    # ... and so is a row of the same name that evaluated other tasks
    with pytest.raises(UserError, match="evaluated wikitext2,c4, this run asks wikitext2"):
        run_plan(settings, out, [Config(None, evals=("wikitext2",))], log=logs.append)


def test_plans_and_cli(tmp_path, capsys):
    names = [c.name for c in table1_configs()]
    assert names[0] == "dense" and len(names) == len(set(names))
    assert "wanda-activation-0.5-c4-s2" in names and "sparsegpt-uniform-2of4-c4-s0" in names
    # every sparsity gets every seed of the seeded allocations, after its own seed-0 row
    for s in ("0.5", "0.6", "0.7"):
        for a in ("uniform", "activation"):
            rows = [names.index(f"wanda-{a}-{s}-c4-s{k}") for k in (0, 1, 2)]
            assert rows == sorted(rows)
    assert names.index("wanda-uniform-0.5-c4-s1") < names.index("wanda-owl-0.5-c4-s0")
    cal = calibration_configs()
    assert [c.calibration for c in cal[1:]] == ["boolq", "mmlu", "siqa", "hellaswag", "c4"]
    assert main(["reproduce", "table1", "--out", str(tmp_path / "r"), "--plan",
                 "--sparsities", "0.5", "--seeds", "0"]) == 0
    assert "wanda-activation-0.5-c4-s0" in capsys.readouterr().out
    assert "unknown configuration 'nope'" in fail(capsys, "reproduce", "table1", "--out",
                                                  tmp_path / "r", "--only", "nope")
    # --tasks: the zero-shot rows evaluate a subset
    assert main(["reproduce", "calibration", "--out", str(tmp_path / "r"), "--plan",
                 "--tasks", "boolq,siqa", "--datasets", "c4"]) == 0
    assert "wanda-uniform-0.5-c4-s0-zs                   evals: boolq,siqa" in \
        capsys.readouterr().out
    assert calibration_configs(tasks=("boolq",))[1].evals == ("boolq",)
    # --seeded-allocations: which Wanda rows get every seed
    seeded = [c.name for c in table1_configs((0.7,), (0, 1), seeded=("owl",)) if c.seed == 1]
    assert seeded == ["wanda-owl-0.7-c4-s1"]
    assert "unknown allocation 'owll'" in fail(capsys, "reproduce", "table1", "--out",
                                               tmp_path / "r", "--plan",
                                               "--seeded-allocations", "owll")
    assert "unknown zero-shot task 'boolx'" in fail(capsys, "reproduce", "table1", "--out",
                                                    tmp_path / "r", "--plan", "--tasks", "boolx")


def test_reproduce_fig1_profiles_counts_plot_and_resumes(tmp_path):
    import shutil

    data = _data(tmp_path / "data")
    model = save_tiny_lm(tmp_path / "m")
    out = tmp_path / "fig1"
    argv = ["reproduce", "fig1", "--model", model, "--datasets", "c4,wikitext2", "--samples", "2",
            "--seq-len", "16", "--data-dir", data, "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    counts = json.loads((out / "counts.json").read_text())
    assert [c["dataset"] for c in counts] == ["c4", "wikitext2"]
    assert all(len(c["layer_counts"]) == 2 and c["gamma_rule"] == "quantile=0.1" for c in counts)
    assert (out / "fig1.png").stat().st_size > 0
    shutil.rmtree(model)  # finished profiles are reused: the model is not loaded again
    assert main(argv) == 0


def test_reproduce_calibration_end_to_end_writes_the_specificity_summary(tmp_path, any_data,
                                                                         capsys):
    """Validation 2 on a tiny model and the real local data: two calibration sets, all five
    tasks, then OUT/calibration.json with the own-set check and the relatedness correlation."""
    out = tmp_path / "cal"
    relate = tmp_path / "relate.json"
    names = ["c4", "siqa", "boolq", "piqa", "hellaswag", "mmlu"]
    relate.write_text(json.dumps({"datasets": names, "bands": {"all": {"matrix": [
        [1.0 if i == j else 0.5 for j in range(6)] for i in range(6)]}}}))
    argv = ["reproduce", "calibration", "--model", save_tiny_lm(tmp_path / "m", context=4096), "--out",
            str(out), "--datasets", "siqa,c4", "--zero-shot-limit", "2",
            "--calibration-samples", "2", "--calibration-seq-len", "16", "--data-dir", any_data,
            "--device", "cpu", "--quiet", "--relate", str(relate)]
    assert main(argv) == 0
    assert "own calibration set gives the strictly best acc on" in capsys.readouterr().out
    recs = {p.stem: json.loads(p.read_text()) for p in (out / "configs").glob("*.json")}
    assert set(recs) == {"dense-zs", "wanda-uniform-0.5-siqa-s0-zs", "wanda-uniform-0.5-c4-s0-zs"}
    siqa = recs["wanda-uniform-0.5-siqa-s0-zs"]
    assert "siqa/validation.jsonl (rows >= 200" in siqa["calibration"]["source"]
    assert siqa["eval"]["siqa"]["n"] == 2
    spec = json.loads((out / "calibration.json").read_text())
    assert set(spec) == {"kind", "acc", "acc_norm", "acc_balanced"}
    acc = spec["acc"]
    assert acc["calibrations"] == ["c4", "siqa"] and len(acc["tasks"]) == 5
    want = siqa["eval"]["siqa"]["acc"]
    assert acc["acc"]["siqa"]["siqa"] == want and acc["own"]["siqa"]["acc"] == want
    assert acc["own"]["siqa"]["of"] == 2
    # relatedness pairs: every (calibration, task) with both in the matrix; piqa included here
    assert acc["relatedness"]["all"]["n_pairs"] == 2 * 5
    assert (out / "calibration.png").stat().st_size > 0
    md = (out / "calibration.md").read_text()
    assert "| siqa | " in md and f"**{want:.3f}**" in md and "Own calibration set strictly best on" in md
    # the HTML report shows it
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Calibration specificity (cal)" in page and "rho (without own set)" in page
    # a bad --relate file is refused before any work, exit 2
    relate.write_text("[1, 2]")
    assert "not a relatedness JSON" in fail(capsys, *argv[:-1], relate)


def test_qa_calibration_never_uses_the_evaluated_items(any_data):
    from types import SimpleNamespace

    from tinylm import char_tokenizer

    from actpat.experiments.runner import _calibration

    lm = SimpleNamespace(tokenizer=char_tokenizer())
    for limit, first in ((50, 200), (300, 300)):
        s = Settings(data_dir=any_data, zero_shot_limit=limit, calib_samples=2, calib_seq_len=16)
        calib = _calibration(lm, s, Config("wanda", calibration="siqa", evals=("siqa",)))
        assert f"rows >= {first}," in calib.source
        evaluated = [json.loads(x)["context"] for x in
                     open(f"{any_data}/siqa/validation.jsonl").read().splitlines()[:limit]]
        text = "".join(_decode(x) for x in calib.sequences)
        assert not any(c in text for c in evaluated if len(c) > 20)


def test_activation_counts_come_from_seed_0_whatever_row_runs_first(tiny_run):
    """The counts profile is made from the seed-0 C4 windows even when the first activation
    row of a run has another calibration seed, so every activation row shares one N_i."""
    settings, _, out = tiny_run
    first_seed1 = run_plan(settings, out / "a", [Config("wanda", "activation", 0.5, seed=1)],
                           log=lambda _: None)[0]
    first_seed0 = run_plan(settings, out / "b", [Config("wanda", "activation", 0.5, seed=0)],
                           log=lambda _: None)[0]
    assert first_seed1["allocation"]["counts"]["counts"] == \
        first_seed0["allocation"]["counts"]["counts"]
    assert first_seed1["allocation"]["sparsities"] == first_seed0["allocation"]["sparsities"]
    meta = [json.loads((out / d / "counts-profile" / "summary.json").read_text()) for d in "ab"]
    assert meta[0]["sample_indices"] == meta[1]["sample_indices"] and meta[0]["seed"] == 0
    assert first_seed1["calibration"]["seed"] == 1  # the pruning itself used its own seed


# --------------------------------------------------------------------------- similarity experiments


def _stop_after(n, real):
    """A score_grams that yields ``n`` batches, then raises KeyboardInterrupt (Ctrl-C)."""
    def gen(*a, **k):
        for i, g in enumerate(real(*a, **k)):
            if i == n:
                raise KeyboardInterrupt
            yield g
    return gen


def _counting(real, seen):
    def gen(*a, **k):
        for g in real(*a, **k):
            seen.append(1)
            yield g
    return gen


TORN = '{"key": [["boolq", "mmlu"], 2, 128'  # a record cut short by a crash, no newline


def test_reproduce_similarity_resumes_after_ctrl_c_and_a_torn_line(tmp_path, capsys,
                                                                    monkeypatch, synthetic_data):
    import numpy as np

    import actpat.analysis.similarity as S

    model = save_tiny_lm(tmp_path / "m")
    argv = ["reproduce", "similarity", "--model", model, "--samples", "2", "--data-dir",
            synthetic_data, "--device", "cpu", "--quiet"]
    ok(capsys, *argv, "--out", tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "similarity.json").read_text())
    assert whole["pairs_done"] == 2 and len(whole["comparisons"]) == 7 + 21

    out = tmp_path / "run"
    real = S.score_grams
    monkeypatch.setattr(S, "score_grams", _stop_after(1, real))
    interrupted(capsys, *argv, "--out", out)
    ckpt = out / "checkpoint.jsonl"
    assert len(ckpt.read_text().splitlines()) == 1 and not (out / "similarity.json").exists()
    with ckpt.open("a") as f:
        f.write(TORN)
    seen = []
    monkeypatch.setattr(S, "score_grams", _counting(real, seen))
    ok(capsys, *argv, "--out", out)
    assert len(seen) == 1  # only the batch the interrupt lost
    got = json.loads((out / "similarity.json").read_text())
    assert got["pairs_done"] == 2
    for a, b in zip(got["comparisons"], whole["comparisons"]):
        assert (a["kind"], a["datasets"]) == (b["kind"], b["datasets"])
        np.testing.assert_allclose(np.array(a["per_pair"], float), np.array(b["per_pair"], float),
                                   rtol=0, atol=1e-9)
    seen.clear()
    ok(capsys, *argv, "--out", out)  # everything is in the checkpoint now, the torn line too
    assert seen == []

    # relatedness from the saved profiles of the finished run; a rerun gives the same file
    runs = [str(p) for p in sorted((tmp_path / "whole" / "profiles").iterdir())]
    assert len(runs) == 7
    rel_argv = ["reproduce", "relatedness", "--runs", *runs, "--out", tmp_path / "rel"]
    ok(capsys, *rel_argv)
    first = (tmp_path / "rel" / "relate.json").read_text()
    rel = json.loads(first)
    m = np.array(rel["bands"]["all"]["matrix"])
    assert m.shape == (7, 7) and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    assert ((m > 0) & (m <= 1 + 1e-12)).all()
    ok(capsys, *rel_argv)
    assert (tmp_path / "rel" / "relate.json").read_text() == first


def test_reproduce_sts_resumes_after_ctrl_c_and_a_torn_line(tmp_path, capsys, monkeypatch,
                                                             synthetic_data):
    import numpy as np

    import actpat.analysis.similarity as S

    model = save_tiny_lm(tmp_path / "m")
    argv = ["reproduce", "sts", "--model", model, "--samples", "20", "--data-dir",
            synthetic_data, "--device", "cpu", "--quiet"]
    ok(capsys, *argv, "--out", tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "sts.json").read_text())
    assert whole["pairs_done"] == 20

    out = tmp_path / "run"
    real = S.pair_similarity
    monkeypatch.setattr(S, "pair_similarity", raise_on_call(2, real))  # 8 pairs, then Ctrl-C
    interrupted(capsys, *argv, "--out", out)
    ckpt = out / "checkpoint.jsonl"
    assert len(ckpt.read_text().splitlines()) == 1 and not (out / "sts.json").exists()
    with ckpt.open("a") as f:
        f.write(TORN)
    counting = raise_on_call(0, real)
    monkeypatch.setattr(S, "pair_similarity", counting)
    ok(capsys, *argv, "--out", out)
    assert counting.calls["n"] == 2  # the remaining 12 pairs: batches of 8 and 4
    got = json.loads((out / "sts.json").read_text())
    assert got["pairs_done"] == 20 and got["indices"] == whole["indices"]
    np.testing.assert_allclose(got["pair_similarity"], whole["pair_similarity"], rtol=0,
                               atol=1e-9)
    assert got["per_layer_spearman"] == pytest.approx(whole["per_layer_spearman"], abs=1e-9)
    counting.calls["n"] = 0
    ok(capsys, *argv, "--out", out)
    assert counting.calls["n"] == 0
