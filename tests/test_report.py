"""The HTML report: built from real command outputs (tiny model), self-contained, and rendered
by headless Chromium (screenshot not blank, the sections and numbers in the DOM, every image
decoded, no resource load attempted outside the page)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess

import pytest

from helpers import run, table_has
from tinylm import save_tiny_lm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-default-apps", "--disable-extensions", "--mute-audio",
                "--virtual-time-budget=10000"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Outputs of every command, on a tiny model and made-up data."""
    root = tmp_path_factory.mktemp("report")
    model = save_tiny_lm(root / "model")
    rng = random.Random(5)
    words = "sun river map stone green quick old seven north open door light".split()

    def sentence(n):
        return " ".join(rng.choice(words) for _ in range(n))

    data = root / "data"
    (data / "wikitext2").mkdir(parents=True)
    (data / "wikitext2" / "test.txt").write_text("\n".join(sentence(40) for _ in range(30)))
    (root / "prose.txt").write_text("\n".join(sentence(12) for _ in range(8)))
    (root / "code.txt").write_text("\n".join(f"def f{i}(x): return x * {i} + {i + 1}"
                                             for i in range(8)))
    (root / "pairs.jsonl").write_text("".join(json.dumps(
        {"sentence1": sentence(6), "sentence2": sentence(6), "score": rng.uniform(0, 5)}) + "\n"
        for _ in range(12)))
    common = ["--device", "cpu", "--quiet"]
    for name in ("prose", "code"):
        run("profile", "--model", model, "--dataset", root / f"{name}.txt", "--samples", "4",
            "--seq-len", "32", "--out", root / "runs" / f"profile-{name}", *common)
    run("similarity", "--model", model, "--dataset", root / "prose.txt", "--dataset",
        root / "code.txt", "--pairs", "3", "--seq-len", "32", "--out",
        root / "runs" / "similarity", *common)
    run("sts", "--model", model, "--dataset", root / "pairs.jsonl", "--samples", "12",
        "--max-tokens", "32", "--bootstrap", "100", "--out", root / "runs" / "sts", *common)
    for method in ("uniform", "activation"):
        run("allocate", "--sparsity", "0.5", "--method", method, "--profile",
            root / "runs" / "profile-prose", "--json",
            root / "runs" / "allocation" / f"{method}.json")
    run("prune", "--model", model, "--sparsity", "0.5", "--pruner", "magnitude",
        "--save", root / "runs" / "pruned", *common)
    (root / "runs" / "eval").mkdir(exist_ok=True)
    run("eval", "--model", model, "--tasks", "wikitext2", "--seq-len", "64", "--limit", "4",
        "--data-dir", data, "--json", root / "runs" / "eval" / "dense.json", *common)
    made = {"profiles", "similarity", "sts", "allocation", "pruning", "evaluation"}
    return root / "runs", made


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory):
    run_dir, _ = runs
    out = tmp_path_factory.mktemp("page") / "report.html"
    run("report", run_dir, "--out", out)
    return out


EXPECTED = {"profiles": "Activated weights per layer (Figure 1)",
            "relatedness": "Dataset relatedness",
            "similarity": "Pattern similarity within and across domains",
            "sts": "Semantic similarity",
            "allocation": "Layer-wise sparsity allocation",
            "pruning": "Pruning",
            "evaluation": "Evaluation: perplexity and zero-shot accuracy"}


def expected_headings(made: set[str]) -> list[str]:
    keys = set(made) | {"relatedness"}  # two profiles of one model: the relatedness heatmap
    return [EXPECTED[k] for k in EXPECTED if k in keys]


def labelled(run_dir) -> list[dict]:
    """Table rows the page must hold: each result's label and value in the same row, formatted
    as the report formats numbers."""
    from actpat.outputs.report.sections import _num

    summary = json.loads((run_dir / "profile-prose" / "summary.json").read_text())
    rows = [{"run": "profile-prose", "samples": str(summary["samples"]),
             "seq len": str(summary["seq_len"]), "seed": str(summary["seed"])}]
    ppl = json.loads((run_dir / "eval" / "dense.json").read_text())["wikitext2"]["ppl"]
    rows.append({"model": "dense", "wikitext2 ppl": _num(ppl)})
    best = json.loads((run_dir / "sts" / "sts.json").read_text())["best"]["activation"]
    rows.append({"signal": "activation", "best layer": str(best["layer"]), "ρ": _num(best["rho"])})
    rec = json.loads((run_dir / "pruned" / "actpat_prune.json").read_text())
    rows.append({"pruned model": "pruned", "pruner": "magnitude",
                 "achieved": _num(rec["achieved_sparsity"])})
    alloc = json.loads((run_dir / "allocation" / "activation.json").read_text())
    rows.append({"method": "activation", "target S": "0.5",
                 "min S_i": _num(min(alloc["layer_sparsities"]))})
    sim = json.loads((run_dir / "similarity" / "similarity.json").read_text())
    rows.append({"pairs": str(len(sim["comparisons"][0]["per_pair"]))})
    return rows


def assert_labelled(html: str, run_dir) -> None:
    for cells in labelled(run_dir):
        assert table_has(html, **cells), cells


def test_page_is_self_contained_and_complete(runs, page):
    run_dir, made = runs
    html = page.read_text()
    for heading in expected_headings(made):
        assert heading in html, heading
    assert_labelled(html, run_dir)
    srcs = re.findall(r'\b(?:src|href)="([^"#][^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), \
        [s[:40] for s in srcs if not s.startswith("data:")]
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "default-src 'none'" in html
    # settings are stated: model, data source, seq len, seed, gamma, versions
    for word in ("seq len", "seed", "gamma", "versions", "data source", "model"):
        assert word in html, word


def test_report_of_nothing_and_of_a_broken_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    run("report", empty, "--out", tmp_path / "a.html")
    assert "No results found" in (tmp_path / "a.html").read_text()
    (empty / "similarity.json").write_text("{ not json")
    run("report", empty, "--out", tmp_path / "b.html")
    assert "not readable JSON" in (tmp_path / "b.html").read_text()


def chromium(args: list[str], url: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, *args, url], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install "
                                             "chromium; .ci/run installs it)")
def test_renders_in_headless_chromium(runs, page, tmp_path):
    from PIL import Image

    run_dir, made = runs
    shot = tmp_path / "shot.png"
    r = chromium(["--window-size=1200,2400", f"--screenshot={shot}"], page.as_uri())
    assert shot.exists(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, lines, figures: not a blank page
    white = max(colors)[0] / (img.size[0] * img.size[1])
    assert white < 0.97
    dom = chromium(["--dump-dom"], page.as_uri()).stdout
    root = re.search(r"<html[^>]*>", dom).group(0)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', root))
    assert attrs.get("rendered") == "yes", root
    assert attrs["broken-images"] == "0" and attrs["blocked-loads"] == "0", root
    assert int(attrs["images"]) >= 3
    for heading in expected_headings(made):
        assert re.search(r"<h2>" + re.escape(heading), dom), heading
    assert_labelled(dom, run_dir)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install "
                                             "chromium; .ci/run installs it)")
def test_render_check_detects_external_and_broken_loads(tmp_path):
    """The counters the render test reads do count a blocked network load and a broken image."""
    from actpat.outputs.report.page import render_html
    from actpat.outputs.report.sections import Section

    bad = Section("bad", "Bad", '<img src="http://example.invalid/x.png" alt="x">'
                                '<img src="data:image/png;base64,AAAA" alt="y">')
    page = tmp_path / "bad.html"
    page.write_text(render_html([bad], []))
    dom = chromium(["--dump-dom"], page.as_uri()).stdout
    root = re.search(r"<html[^>]*>", dom).group(0)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', root))
    assert attrs["broken-images"] == "2" and int(attrs["blocked-loads"]) >= 1, root


def test_report_of_reproduction_configs(tmp_path):
    """`actpat reproduce` configurations (config + eval per JSON) become one results table."""
    configs = tmp_path / "table1" / "configs"
    configs.mkdir(parents=True)
    settings = {"model": "m", "seq_len": 256, "windows": 8, "calib_samples": 4,
                "calib_seq_len": 64, "gamma_quantile": 0.1}
    for name, pruner, alloc, ppl in [("dense", None, "uniform", 16.75),
                                     ("wanda-uniform", "wanda", "uniform", 32.125),
                                     ("wanda-activation", "wanda", "activation", 31.25)]:
        (configs / f"{name}.json").write_text(json.dumps({
            "name": name, "settings": settings,
            "config": {"pruner": pruner, "allocation": alloc, "sparsity": 0.5 if pruner else 0.0,
                       "pattern": "unstructured", "calibration": "c4", "seed": 0},
            "prune": {"achieved_sparsity": 0.5} if pruner else None,
            "eval": {"wikitext2": {"ppl": ppl, "seq_len": 256, "windows": 8}}}))
    run("report", tmp_path / "table1", "--out", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "Pruning experiments (table1)" in html
    for text in ("16.75", "32.12", "31.25", "wanda-activation", "wikitext2 ppl", "8 windows"):
        assert text in html, text
