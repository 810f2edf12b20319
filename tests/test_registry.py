"""The one Registry: duplicates refused, unknown names listed; an allocator registered from
outside the package is one entry and works through `actpat prune` with its own flag."""

from __future__ import annotations

import json

import pytest

from tinylm import save_tiny_lm

from actpat.cli import main
from actpat.errors import UserError
from actpat.registry import Registry
from actpat.sparsity.allocation import Option, register_allocator
from actpat.sparsity.allocators import ALLOCATORS


def test_registry_refuses_duplicates_and_names_what_exists():
    r: Registry[int] = Registry("widget")
    r.add("a", 1)
    r.register("b")(2)
    assert r["a"] == 1 and "b" in r and list(r) == ["a", "b"] and len(r) == 2
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        r.add("a", 3)
    assert r["a"] == 1
    with pytest.raises(UserError, match=r"^unknown widget 'c'; available: a, b$"):
        r.get("c")


def test_every_library_registry_refuses_a_taken_name():
    from actpat.sparsity.pruners import PRUNERS, Pruner

    with pytest.raises(ValueError):
        PRUNERS.add("wanda", Pruner("wanda", None, lambda w, s, sp, nm: w))
    with pytest.raises(ValueError):
        register_allocator("uniform")(lambda sparsity, **kw: [sparsity])


@pytest.fixture
def tilted():
    """An allocator defined here, outside actpat: deeper layers get more sparsity."""
    @register_allocator("tilted", needs=("model",), options=(
        Option("tilt", 0.1, "tilted: S_i = S + tilt * (i - (L-1)/2) / L"),))
    def tilted_allocator(sparsity, *, model=None, layer_sizes=None, tilt=0.1, **kw):
        n = len(layer_sizes)
        return [sparsity + tilt * (i - (n - 1) / 2) / n for i in range(n)]

    yield tilted_allocator
    ALLOCATORS.remove("tilted")


def test_allocator_from_outside_through_actpat_prune(tmp_path, tilted, capsys):
    model_dir = save_tiny_lm(tmp_path / "tiny")
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", model_dir, "--sparsity", "0.5", "--pruner", "magnitude",
               "--allocation", "tilted", "--tilt", "0.2", "--save", str(out), "--quiet",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "actpat_prune.json").read_text())
    assert rec["allocation"]["method"] == "tilted" and rec["allocation"]["tilt"] == 0.2
    # two equal-size layers: S_i = 0.5 -+ 0.2 * 0.5 / 2, the mean already 0.5
    assert rec["layer_sparsities"] == pytest.approx([0.45, 0.55], abs=1e-12)
    assert rec["achieved_per_layer"][0] < rec["achieved_per_layer"][1]
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    # the same allocator through `actpat allocate`, and an unknown one refused in one line
    assert main(["allocate", "--sparsity", "0.5", "--method", "tilted", "--model", model_dir,
                 "--device", "cpu"]) == 0
    assert "0.4750" in capsys.readouterr().out  # the option's registered default, tilt 0.1
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit 2
        main(["prune", "--model", model_dir, "--sparsity", "0.5", "--allocation", "tilt",
              "--save", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "invalid choice: 'tilt'" in capsys.readouterr().err


@pytest.fixture
def arc_easy_from_the_docs():
    """Runs docs/architecture.md's dataset-with-task example as written, then takes it out."""
    import re
    from pathlib import Path

    from actpat.data.datasets import CHOICES, DATASETS, GOLD, PROMPTS
    from actpat.evaluation.tasks import TASKS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    block = re.search(r"\*\*A dataset with its zero-shot task\*\*.*?```python\n(.*?)```", doc,
                      re.S).group(1)
    exec(compile(block, "docs/architecture.md", "exec"), {})
    yield
    for table in (PROMPTS, CHOICES, GOLD):
        table.pop("arc_easy")
    DATASETS.remove("arc_easy")
    TASKS.remove("arc_easy")


def test_dataset_and_task_from_the_docs_evaluate_and_calibrate(tmp_path, arc_easy_from_the_docs):
    from tiny import tiny_model
    from tinylm import char_tokenizer

    from actpat.data.calibration import calibration_sequences
    from actpat.evaluation.evaluate import zero_shot

    rows = [{"question": f"Which {i}?", "answerKey": "B",
             "choices": {"text": [f"wrong {i}", f"right {i}"], "label": ["A", "B"]}}
            for i in range(6)]
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "validation.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    model, tok = tiny_model("llama"), char_tokenizer()
    res = zero_shot(model, tok, ["arc_easy"], limit=4, batch_size=2, data_dir=str(tmp_path),
                    log_samples=True)["arc_easy"]
    assert res["n"] == 4 and res["source"].startswith("local:")
    assert all(s["target"] == 1 for s in res["samples"])  # GOLD: the index of answerKey "B"
    assert res["gold_share"] == pytest.approx([0.0, 1.0])
    calib = calibration_sequences(tok, "arc_easy", 1, 50, data_dir=str(tmp_path),
                                  exclude_first=4)
    text = tok.decode(list(calib.sequences[0])).replace(" ", "")  # one char per token
    assert "Answer:right" in text and "wrong" not in text  # the gold choice follows the prompt
