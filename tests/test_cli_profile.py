"""End to end on SmolLM2: `actpat profile` then `actpat counts` with the local data dir."""

import json

import pytest
from safetensors.torch import load_file

from actpat.cli import main
from helpers import fail


@pytest.mark.slow
def test_profile_and_counts_on_smollm2(tmp_path, data_dir, smollm2, capsys):
    runs = []
    for ds in ("boolq", "c4"):
        out = tmp_path / ds
        rc = main(["profile", "--model", "smollm2-135m", "--dataset", ds, "--samples", "4",
                   "--seq-len", "48", "--batch-size", "3", "--device", "cpu", "--quiet",
                   "--data-dir", data_dir, "--out", str(out), "--no-cache"])
        assert rc == 0
        runs.append(str(out))
    summary = json.loads((tmp_path / "boolq" / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["seq_len"] == 48 and summary["seed"] == 0
    assert summary["data_source"].startswith("local:")
    assert summary["objective"] == "max-logit"
    assert "torch" in summary["versions"] and summary["model"]["sha256"]
    maps = load_file(str(tmp_path / "boolq" / "profile.safetensors"))
    assert len(maps) == 30 * 7
    assert maps["model.layers.0.self_attn.k_proj"].shape == (192, 576)

    js, png = tmp_path / "counts.json", tmp_path / "fig1.png"
    assert main(["counts", *runs, "--gamma-quantile", "0.05", "--json", str(js),
                 "--plot", str(png)]) == 0
    res = json.loads(js.read_text())
    assert [r["run"] for r in res] == runs
    assert res[0]["gamma"] == res[1]["gamma"]  # one gamma for all runs
    for r in res:
        assert len(r["layer_counts"]) == 30 and all(isinstance(c, int) for c in r["layer_counts"])
        assert set(r["matrix_counts"]) == {"q", "k", "v", "o", "gate", "up", "down"}
        assert [sum(x) for x in zip(*r["matrix_counts"].values())] == r["layer_counts"]
        assert r["scored_per_layer"] == [3 * 576 * 1536 + 2 * 576 * 576 + 2 * 576 * 192] * 30
    # the reference run has exactly 5% of its weights above gamma (up to ties)
    share = sum(res[0]["layer_counts"]) / sum(res[0]["scored_per_layer"])
    assert abs(share - 0.05) < 1e-4
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "layer" in out and "gamma=" in out

    # bad input: one line, exit code 2
    msg = fail(capsys, "profile", "--model", "smollm2-135m", "--dataset", "nosuch", "--samples",
               "2", "--out", tmp_path / "x", "--device", "cpu")
    assert "unknown dataset 'nosuch'" in msg
