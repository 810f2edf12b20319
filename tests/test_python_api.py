"""The Python front door: docs/python-api.md's example runs as written on SmolLM2 loaded as an
in-memory AutoModelForCausalLM, and `import actpat` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_import_is_lazy():
    code = "import sys, actpat; assert 'torch' not in sys.modules; print(actpat.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(DOC.parents[1]), "PATH": ""})
    assert out.returncode == 0, out.stderr
    import actpat

    assert callable(actpat.load_model) and callable(actpat.prune)
    with pytest.raises(AttributeError):
        actpat.no_such_name


@pytest.mark.slow
def test_python_api_example_runs(smollm2, capsys):
    block = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(block, str(DOC), "exec"), scope)
    model, s, achieved = scope["model"], scope["s"], scope["achieved"]
    assert type(model).__name__ == "LlamaForCausalLM"  # a plain transformers model, no wrapper
    n_layers = model.config.num_hidden_layers
    assert len(s) == n_layers == len(achieved)
    assert len(set(round(x, 6) for x in s)) > 1  # activation allocation is not uniform
    # each layer ends within half a weight per row of its target (rounded per-row counts)
    assert all(abs(a - t) < 0.01 for a, t in zip(achieved, s))
    assert scope["pruned"] > scope["dense"] > 1
    assert f"{n_layers} layers" in capsys.readouterr().out


def test_front_door_on_a_tiny_model():
    """Every function on a tiny in-memory model; the handle form gives the same numbers."""
    import torch

    import actpat
    from tiny import tiny_model

    class Tok:  # a character tokenizer with the two calls the front door makes
        pad_token_id = 0
        eos_token = "\n"

        def __call__(self, text, add_special_tokens=True, return_tensors=None):
            ids = [1 + ord(c) % 60 for c in text]
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    torch.manual_seed(0)
    model, tok = tiny_model("llama"), Tok()
    texts = ["alpha beta gamma delta", "one two three four five", "x = y + 1; print(x)"]
    prof = actpat.profile(model, tok, texts, seq_len=16)
    handle = actpat.LoadedModel(model, tok, "tiny", {"spec": "tiny"})
    again = actpat.profile(handle, None, texts, seq_len=16)
    assert all(torch.equal(prof.maps[k], again.maps[k]) for k in prof.maps)
    n = actpat.counts(prof)
    assert len(n.layer_counts) == 2 and sum(n.layer_counts) > 0
    s = actpat.allocate("activation", 0.5, counts=n, model=model)
    assert len(s) == 2
    dense = actpat.perplexity(model, tok, texts * 4, seq_len=8)
    achieved = actpat.prune(model, tok, texts * 8, 0.5, allocation=s, seq_len=8)
    # per-row counts are rounded: a row of 32 inputs lands within half a weight (1/64)
    assert all(abs(a - t) <= 1 / 64 + 1e-9 for a, t in zip(achieved, s))
    assert actpat.perplexity(model, tok, texts * 4, seq_len=8) != dense
    with pytest.raises(actpat.UserError, match="unknown allocation 'nope'; available: uniform"):
        actpat.allocate("nope", 0.5, model=model)
    with pytest.raises(actpat.UserError, match="one per layer"):
        actpat.prune(model, tok, texts * 8, 0.5, allocation=[0.5], seq_len=8)
