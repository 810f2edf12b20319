"""What a reader of the report and the Table-1 figure relies on: accuracies carry their n and
standard error, and the allocation curves are grouped one panel per sparsity."""

from __future__ import annotations

import json

import pytest

from actpat.experiments.tables import allocation_panels
from actpat.outputs.report.page import write_report


def test_report_accuracies_carry_their_standard_error(tmp_path):
    run = tmp_path / "run" / "eval"
    run.mkdir(parents=True)
    result = {"boolq": {"acc": 0.34, "acc_norm": 0.7, "n": 50, "split": "validation",
                        "source": "local:x"},
              "wikitext2": {"ppl": 21.5, "seq_len": 128, "windows": 40, "source": "local:y"}}
    (run / "dense.json").write_text(json.dumps(result))
    page = tmp_path / "report.html"
    write_report([tmp_path / "run"], page)
    html = page.read_text()
    se = (0.34 * 0.66 / 50) ** 0.5
    assert f"0.340 ± {se:.3f}" in html  # 0.067: a 0.34 vs 0.70 gap at n = 50 is 5 SE, 0.04 is not
    assert f"0.700 ± {(0.7 * 0.3 / 50) ** 0.5:.3f}" in html
    assert "40 windows × 128 tokens" in html and "n = 50" in html


def test_allocation_panels_group_by_sparsity_seed_0_unstructured():
    def rec(alloc, s, seed=0, pattern="unstructured", pruner="wanda"):
        return {"config": {"allocation": alloc, "sparsity": s, "seed": seed, "pattern": pattern,
                           "pruner": pruner},
                "allocation": {"sparsities": [s, s + 0.01]}}

    panels = allocation_panels([rec("uniform", 0.6), rec("activation", 0.5), rec("owl", 0.5),
                                rec("owl", 0.5, seed=1), rec("uniform", 0.5, pattern="2:4"),
                                {"config": {"allocation": None, "sparsity": 0.0, "seed": 0,
                                            "pattern": "unstructured", "pruner": None}}])
    assert list(panels) == ["S = 0.5", "S = 0.6"]
    assert list(panels["S = 0.5"]) == ["activation", "owl"]  # seed 1 and 2:4 left out
    assert panels["S = 0.6"]["uniform"] == pytest.approx([0.6, 0.61])
