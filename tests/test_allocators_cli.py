"""atp, dlp and search through the command line and the Table-1 runner on a tiny model: one
registry entry each, held-apart windows drawn after the pruning ones and never pruning."""

import json

import pytest

from actpat.cli import main
from actpat.sparsity.allocators import ALLOCATORS
from actpat.sparsity.allocators_2025 import atp_schedule
from helpers import fail


def test_one_registry_entry_each():
    for name in ("atp", "dlp", "search"):
        assert name in ALLOCATORS
    assert {"held", "counts"} <= ALLOCATORS["search"].needs
    assert "held" in ALLOCATORS["atp"].needs and "held" not in ALLOCATORS["dlp"].needs


def test_cli_allocate_and_prune_new_allocators(tmp_path, data_dir):
    from tinylm import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    common = ["--model", model_dir, "--data-dir", data_dir, "--calibration-samples", "3",
              "--seq-len", "40", "--quiet", "--device", "cpu", "--held-windows", "2"]
    records = {}
    for method, extra in (("atp", ["--atp-step", "0.1"]), ("dlp", []),
                          ("search", ["--search-budget", "5", "--profile-samples", "2"])):
        out = tmp_path / f"{method}.json"
        assert main(["allocate", "--sparsity", "0.6", "--method", method, "--json", str(out)]
                    + extra + common) == 0
        rec = records[method] = json.loads(out.read_text())
        s = rec["layer_sparsities"]
        assert len(s) == 2 and sum(s) / 2 == pytest.approx(0.6)
    atp = records["atp"]
    assert atp["layer_sparsities"] == pytest.approx(atp_schedule(0.6, atp["atp"]["beta"], 2))
    # 2 layers: S_i = 0.6 -/+ beta/2 stays in [0, 0.999] up to beta 0.798
    betas = [t["beta"] for t in atp["atp"]["trials"]]
    assert betas == pytest.approx([0.1 * k for k in range(1, 8)])
    for method in ("atp", "search"):
        held = records[method]["held_windows"]
        # the held-apart windows are c4 train documents other than the 3 pruning windows'
        assert held["samples"] == 2 and held["split"] == "train"
        assert not set(held["indices"]) & set(records[method]["calibration"]["indices"])
        assert len(records[method]["calibration"]["indices"]) == 3
    assert records["search"]["search"]["evaluations"] == 5
    assert records["dlp"]["dlp"]["alpha"] == 0.15 and len(records["dlp"]["dlp"]["medians"]) == 2
    # prune with the search: the held-apart windows never calibrate the pruning
    assert main(["prune", "--sparsity", "0.6", "--allocation", "search", "--search-budget", "3",
                 "--profile-samples", "2", "--save", str(tmp_path / "p")] + common) == 0
    rec = json.loads((tmp_path / "p" / "actpat_prune.json").read_text())
    assert rec["calibration"]["samples"] == 3
    assert rec["allocation"]["held_windows"]["samples"] == 2
    assert rec["allocation"]["search"]["evaluations"] == 3
    assert rec["achieved_sparsity"] == pytest.approx(0.6, abs=0.02)


def test_cli_bad_held_windows(tmp_path, data_dir, capsys):
    from tinylm import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    err = fail(capsys, "allocate", "--sparsity", "0.5", "--method", "atp", "--model", model_dir,
               "--data-dir", data_dir, "--held-windows", "0", "--device", "cpu")
    assert "--held-windows must be at least 1" in err
    err = fail(capsys, "allocate", "--sparsity", "0.5", "--method", "search", "--model",
               model_dir, "--data-dir", data_dir, "--search-budget", "0", "--profile-samples",
               "2", "--calibration-samples", "3", "--seq-len", "40", "--device", "cpu")
    assert "--search-budget must be at least 1" in err


def test_reproduce_table1_runs_the_new_allocators(tmp_path, data_dir):
    from tinylm import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    out = tmp_path / "run"
    names = "wanda-atp-0.5-c4-s0,wanda-dlp-0.5-c4-s0,wanda-search-0.5-c4-s0"
    args = ["reproduce", "table1", "--model", model_dir, "--out", str(out), "--data-dir",
            data_dir, "--sparsities", "0.5", "--seeds", "0", "--no-zero-shot", "--windows", "2",
            "--seq-len", "32", "--calibration-samples", "3", "--calibration-seq-len", "32",
            "--profile-samples", "2", "--allocations", "uniform,activation,atp,dlp,search",
            "--only", names, "--quiet", "--device", "cpu"]
    assert main(args) == 0
    for name in names.split(","):
        rec = json.loads((out / "configs" / f"{name}.json").read_text())
        assert sum(rec["allocation"]["sparsities"]) / 2 == pytest.approx(0.5)
        assert rec["calibration"]["samples"] == 3
        assert "wikitext2" in rec["eval"]
    search = json.loads((out / "configs" / "wanda-search-0.5-c4-s0.json").read_text())
    assert search["allocation"]["held_windows"]["samples"] == 8
    assert (out / "allocation-state" / "wanda-search-0.5-c4-s0.json").exists()
    assert "| 0.5 | wanda | search |" in (out / "table.md").read_text()
