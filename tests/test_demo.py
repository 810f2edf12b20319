"""The demo end to end: with the built-in probe texts on a tiny model (fast), and on SmolLM2 with
the local benchmark subsets at --quick sizes (slow)."""

from __future__ import annotations

import json
import os

import pytest

from tinylm import save_tiny_lm

from actpat.cli import main


def test_demo_with_probe_texts_resumes(tmp_path, capsys, offline, monkeypatch):
    """No data dir and no hub: the probe texts, real-data steps skipped, the report written; a
    second run keeps every finished step."""
    monkeypatch.delenv("ACTPAT_DATA_DIR", raising=False)
    model = save_tiny_lm(tmp_path / "model")
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--model", model, "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "built-in probe texts" in printed
    state = json.loads((out / "demo.json").read_text())
    steps = state["steps"]
    assert state["data_mode"] == "probes" and state["seed"] == 0
    assert steps["sts"]["status"] == "skipped"  # no packaged sentence pairs
    for name in ("prune", "eval"):  # the smoke run: Wanda on the probe texts, held-out perplexity
        assert steps[name]["status"] == "done", steps[name]
    smoke = json.loads((out / "eval" / "smoke.json").read_text())
    assert "not a benchmark" in smoke["label"] and smoke["corpus"] == "probes/heldout.txt"
    assert [r["model"] for r in smoke["rows"]] == ["dense", "wanda-uniform", "wanda-activation"]
    assert all(r["ppl"] > 1 and r["windows"] >= 1 for r in smoke["rows"])
    for method in ("uniform", "activation"):
        record = json.loads((out / "pruned" / method / "actpat_prune.json").read_text())
        assert record["calibration"]["dataset"] == "probes"
        assert abs(record["achieved_sparsity"] - 0.5) < 0.01
    assert steps["profiles"]["status"] == "done" and steps["report"]["status"] == "done"
    assert sorted(p.name for p in (out / "profiles").iterdir()) == sorted(
        ["probe-arithmetic", "probe-code", "probe-prose", "probe-questions"])
    html = (out / "report.html").read_text()
    assert "Activated weights per layer" in html
    assert "Smoke run on packaged texts (not a benchmark)" in html
    before = (out / "profiles" / "probe-code" / "profile.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "profiles: done earlier, kept" in again
    assert (out / "profiles" / "probe-code" / "profile.safetensors").stat().st_mtime_ns == before


def test_demo_with_a_local_data_folder_runs_every_step(tmp_path, capsys, synthetic_data):
    """The synthetic data folder (a fresh clone): every step runs, on a tiny model."""
    model = save_tiny_lm(tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", model, "--out", str(out), "--data-dir",
                 synthetic_data, "--device", "cpu", "--quiet"]) == 0
    state = json.loads((out / "demo.json").read_text())
    assert state["data_mode"] == "local"
    assert all(v["status"] == "done" for v in state["steps"].values()), state["steps"]
    rec = json.loads((out / "pruned" / "activation" / "actpat_prune.json").read_text())
    assert rec["calibration"]["source"].startswith(f"local:{synthetic_data}")
    assert rec["allocation"]["method"] == "activation"
    dense = json.loads((out / "eval" / "dense.json").read_text())
    assert set(dense) == {"wikitext2", "boolq", "piqa"} and dense["wikitext2"]["ppl"] > 1


@pytest.mark.slow
def test_demo_quick_on_smollm2(tmp_path, data_dir, capsys, smollm2_gguf):
    """`actpat demo --quick` on SmolLM2-135M with the local benchmark subsets: every step runs."""
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--out", str(out), "--data-dir", data_dir, "--device", "cpu",
               "--quiet"])
    state = json.loads((out / "demo.json").read_text())
    assert rc == 0, state["steps"]
    assert state["data_mode"] == "local"
    assert all(v["status"] == "done" for v in state["steps"].values()), state["steps"]
    for f in ("figure1.png", "similarity/similarity.json", "sts/sts.json",
              "allocation/activation.json", "pruned/activation/actpat_prune.json",
              "eval/dense.json", "eval/wanda-activation.json", "report.html"):
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    for heading in ("Activated weights per layer", "Pattern similarity", "Semantic similarity",
                    "Layer-wise sparsity allocation", "Pruning", "Evaluation"):
        assert heading in html, heading
    assert os.path.getsize(out / "report.html") > 50_000
