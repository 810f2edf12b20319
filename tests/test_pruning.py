"""Pruners, patterns, the sequential loop, calibration windows and saving."""

import copy
import json
import math

import pytest
import torch

from actpat.data.calibration import calibration_sequences
from actpat.cli import main
from actpat.errors import UserError
from actpat.models.architectures import decoder_layers, scored_matrices
from actpat.sparsity.layerwise import capture_layer_inputs, prune_model
from actpat.sparsity.masks import nm_mask, parse_pattern, row_mask
from actpat.sparsity.pruners import sparsegpt_prune
from actpat.sparsity.saving import PRUNE_RECORD, load_record, save_pruned
from transformers.pytorch_utils import Conv1D

from helpers import calib, fail
from reference import linear_modules, out_in
from tiny import ARCHS, tiny_model
from tinylm import CHARS, SPECIAL, char_tokenizer, save_tiny_lm


def by_layer(model):
    out = {}
    for m in scored_matrices(model):
        out.setdefault(m.layer, []).append(m)
    return out


# --------------------------------------------------------------------------- naive reference


def naive_wanda(model, seqs, sparsities, nm=None):
    """Wanda by plain loops: for each layer, one full forward of the (partly pruned) model with
    hooks recording the layer's matrix inputs, then per-row sorting of |W| * ||X_j||. Modules
    are found with plain torch (reference.linear_modules), not with actpat's adapters."""
    ids = torch.tensor(seqs)
    layers: dict[int, dict] = {}
    for name, (i, _, module) in linear_modules(model).items():
        layers.setdefault(i, {})[name] = module
    for layer, mats in sorted(layers.items()):
        inputs = {name: [] for name in mats}
        hooks = [module.register_forward_hook(
            lambda mod, inp, out, name=name: inputs[name].append(inp[0].detach()))
            for name, module in mats.items()]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        for name, module in mats.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]]).double()
            norm = x.norm(dim=0)
            w = out_in(module).detach().double()
            rows, cols = w.shape
            mask = torch.zeros(rows, cols, dtype=torch.bool)
            for r in range(rows):
                score = [(float(w[r, j].abs() * norm[j]), j) for j in range(cols)]
                if nm:
                    n, mm = nm
                    for g0 in range(0, cols, mm):
                        for _, j in sorted(score[g0:g0 + mm])[:n]:
                            mask[r, j] = True
                else:
                    k = math.floor(cols * sparsities[layer] + 0.5)
                    for _, j in sorted(score)[:k]:
                        mask[r, j] = True
            with torch.no_grad():
                weight = module.weight
                weight[mask.t() if isinstance(module, Conv1D) else mask] = 0.0
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_equals_naive_implementation(arch):
    seqs = calib()
    ours, ref = tiny_model(arch), tiny_model(arch)
    prune_model(ours, seqs, [0.4, 0.6], "wanda", batch_size=3, progress=False)
    naive_wanda(ref, seqs, [0.4, 0.6])
    for a, b in zip(scored_matrices(ours), scored_matrices(ref)):
        assert torch.equal(a.module.weight == 0, b.module.weight == 0), (arch, a.name)
        assert torch.equal(a.module.weight, b.module.weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_wanda_nm_equals_naive_implementation(arch):
    seqs = calib()
    ours, ref = tiny_model(arch), tiny_model(arch)
    prune_model(ours, seqs, [0.5, 0.5], "wanda", pattern="2:4", batch_size=4, progress=False)
    naive_wanda(ref, seqs, None, nm=(2, 4))
    for a, b in zip(scored_matrices(ours), scored_matrices(ref)):
        assert torch.equal(a.module.weight, b.module.weight), (arch, a.name)


# --------------------------------------------------------------------------- the loop itself


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_inputs_replay_the_dense_model(arch):
    """Running the layers one by one on the captured inputs gives the model's own last-layer
    output (masks / position embeddings per layer; T=24 > gemma3's sliding window of 16)."""
    model = tiny_model(arch)
    seqs = calib(5, 24)
    captured = capture_layer_inputs(model, seqs, batch_size=2)
    assert [h.shape[:2] for h in captured.hidden] == [(2, 24), (2, 24), (1, 24)]
    layers = decoder_layers(model)
    outputs = []
    h = layers[-1].register_forward_hook(lambda m, i, o: outputs.append(
        o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(torch.tensor(seqs))
    h.remove()
    hidden = captured.hidden
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hidden = [captured.call(layer, i, b, x) for b, x in enumerate(hidden)]
    assert torch.allclose(torch.cat(hidden), outputs[0], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi3"])
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_achieved_sparsity_within_one_weight_per_row(arch, pruner):
    model = tiny_model(arch)
    target = [0.33, 0.71]
    report = prune_model(model, calib(), target, pruner, progress=False)
    for m in scored_matrices(model):
        rows, cols = m.weight.shape
        zeros = int((m.weight == 0).sum())
        assert abs(zeros - target[m.layer] * rows * cols) <= rows, (m.name, zeros)
        if pruner == "wanda":  # every row exactly round(S * cols)
            k = math.floor(target[m.layer] * cols + 0.5)
            assert ((m.weight == 0).sum(1) == k).all()
    for lay in report["layers"]:  # one weight per row of the narrowest matrix at most
        narrowest = min(m.weight.shape[1] for m in by_layer(model)[lay["layer"]])
        assert abs(lay["achieved"] - lay["target"]) <= 1 / narrowest
    actual = sum(int((m.weight == 0).sum()) for m in scored_matrices(model)) / \
        sum(m.weight.numel() for m in scored_matrices(model))
    assert report["achieved_sparsity"] == pytest.approx(actual)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_nm_structure_exact(pattern, pruner):
    n, m = parse_pattern(pattern)
    model = tiny_model("llama")
    report = prune_model(model, calib(), [0.0, 0.9], pruner, pattern=pattern, progress=False)
    assert report["achieved_sparsity"] == pytest.approx(n / m)
    for sm in scored_matrices(model):
        w = sm.weight
        groups = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (groups == n).all(), sm.name


def test_ties_broken_stably_toward_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0]])
    mask = row_mask(scores, 0.5)  # round(3.5) = 4 pruned: index 4, then 0, 1, 2
    assert mask.tolist() == [[True, True, True, False, True, False, False]]
    g = nm_mask(torch.ones(2, 8), 2, 4)
    assert g.tolist() == [[True, True, False, False] * 2] * 2


def test_tied_gguf_like_weights_prune_deterministically():
    """Quantised weights (few distinct values): exact per-row counts, identical reruns."""
    results = []
    for _ in range(2):
        model = tiny_model("llama")
        with torch.no_grad():
            for m in scored_matrices(model):
                w = m.module.weight
                w.copy_(torch.sign(w) * torch.ceil(w.abs() * 16) / 16)
        prune_model(model, calib(), [0.5, 0.5], "wanda", progress=False)
        results.append([m.weight.clone() for m in scored_matrices(model)])
        for m in scored_matrices(model):
            assert ((m.weight == 0).sum(1) == m.weight.shape[1] // 2).all()
    assert all(torch.equal(a, b) for a, b in zip(*results))


# --------------------------------------------------------------------------- sparsegpt


def _dense_inputs(model, seqs, layer):
    got = {}

    def keep(name, inp):
        got[name] = inp.reshape(-1, inp.shape[-1]).detach()  # returns None: output unchanged

    hooks = [m.module.register_forward_hook(
        lambda mod, inp, out, name=m.name: keep(name, inp[0])) for m in by_layer(model)[layer]]
    with torch.no_grad():
        model(torch.tensor(seqs))
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@torch.no_grad()
def test_sparsegpt_reconstructs_better_than_wanda(pattern):
    seqs = calib(16, 32, seed=1)
    dense = tiny_model("llama", seed=2)
    x = _dense_inputs(dense, seqs, 0)
    errors = {}
    for pruner in ("wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        prune_model(model, seqs, [0.5, 0.0], pruner, pattern=pattern, progress=False)
        errs = {}
        for d, p in zip(by_layer(dense)[0], by_layer(model)[0]):
            assert (p.weight == 0).float().mean() == pytest.approx(0.5, abs=1 / p.weight.shape[1])
            errs[d.name] = float(((x[d.name] @ (p.weight - d.weight).t()) ** 2).sum())
        # the whole layer's output on the dense inputs
        cap = capture_layer_inputs(dense, seqs, 16)
        emb = cap.hidden[0]
        with torch.no_grad():
            out_d = cap.call(decoder_layers(dense)[0], 0, 0, emb)
            out_p = cap.call(decoder_layers(model)[0], 0, 0, emb)
        errs["layer"] = float(((out_p - out_d) ** 2).sum())
        errors[pruner] = errs
        if pruner == "sparsegpt":  # the OBS update beats zeroing the same weights
            for d, p in zip(by_layer(dense)[0], by_layer(model)[0]):
                zeroed = d.weight.masked_fill(p.weight == 0, 0.0)
                plain = float(((x[d.name] @ (zeroed - d.weight).t()) ** 2).sum())
                assert errs[d.name] < plain, d.name
    for name in errors["wanda"]:
        assert errors["sparsegpt"][name] < errors["wanda"][name], name


def test_sparsegpt_at_zero_sparsity_keeps_the_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    x = torch.randn(40, 16, generator=g)
    assert torch.allclose(sparsegpt_prune(w, x.t() @ x, 0.0, None), w, atol=1e-6)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "2:4:8", "a:b", "2-4", "structured"])
def test_malformed_pattern(bad):
    with pytest.raises(UserError, match=f"pattern '{bad}' is not 'unstructured' or N:M"):
        parse_pattern(bad)


def test_bad_inputs_raise_user_errors():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="1 layer sparsities for a model with 2 decoder layers"):
        prune_model(model, calib(), [0.5], "wanda", progress=False)  # one per layer
    with pytest.raises(UserError, match=r"sparsity must be in \[0, 1\) \(got 1.0\)"):
        prune_model(model, calib(), [0.5, 1.0], "wanda", progress=False)
    with pytest.raises(UserError, match="equal lengths"):
        prune_model(model, [[1, 2, 3], [1, 2]], [0.5, 0.5], "wanda", progress=False)
    with pytest.raises(UserError, match="unknown pruner 'obs'"):
        prune_model(model, calib(), [0.5, 0.5], "obs", progress=False)
    with pytest.raises(UserError, match="6 input columns cannot take an N:M pattern with M=4"):
        nm_mask(torch.ones(2, 6), 2, 4)  # 6 columns are not groups of 4


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_save_reload_gives_same_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    prune_model(model, calib(), [0.5, 0.6], "sparsegpt", progress=False)
    model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded config
    save_pruned(model, char_tokenizer(), tmp_path / "out", {"pruner": "sparsegpt"})
    assert model.config.quantization_config == {"quant_method": "gguf"}  # left as it was
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (tmp_path / "out" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor(calib(3, 20, seed=5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # ... and through actpat's own loader (what `actpat eval --model DIR` uses)
    from actpat.models.loading import load_model

    lm = load_model(str(tmp_path / "out"), "cpu")
    assert type(lm.model) is type(model) and lm.identity["path"] == str(tmp_path / "out")
    for a, b in zip(scored_matrices(model), scored_matrices(lm.model)):
        assert torch.equal(a.module.weight, b.module.weight), a.name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm.model(ids).logits)
    text = "a pruned model"
    assert lm.tokenizer(text)["input_ids"] == char_tokenizer()(text)["input_ids"]
    rec = load_record(tmp_path / "out")
    assert rec["pruner"] == "sparsegpt"
    assert rec["achieved_sparsity"] == pytest.approx(0.55, abs=0.01)


# --------------------------------------------------------------------------- calibration


def _decode(ids):
    table = SPECIAL + list(CHARS)
    return "".join(table[i] for i in ids)


def test_qa_calibration_skips_evaluated_rows(tmp_path):
    rows = [{"text": f"<row {i:03d}> " + "abc " * 5} for i in range(60)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = char_tokenizer()
    s = calibration_sequences(tok, str(path), 6, 40, seed=1, exclude_first=20)
    assert [len(x) for x in s.sequences] == [40] * 6
    text = "".join(_decode(x) for x in s.sequences)
    assert all(f"<row {i:03d}>" not in text for i in range(20))
    assert s.indices == [0, 40, 80, 120, 160, 200]  # consecutive windows of one stream
    again = calibration_sequences(tok, str(path), 6, 40, seed=1, exclude_first=20)
    assert again.sequences == s.sequences
    with pytest.raises(UserError):
        calibration_sequences(tok, str(path), 100, 40, seed=1, exclude_first=20)


def test_qa_calibration_appends_gold_answers(any_data):
    from actpat.data.datasets import load_records

    tok = char_tokenizer()
    s = calibration_sequences(tok, "boolq", 40, 64, seed=0, data_dir=any_data, exclude_first=200)
    rows = load_records("boolq", None, any_data).rows
    text = "".join(_decode(x) for x in s.sequences)
    assert "Answer: yes" in text or "Answer: no" in text  # ("\\n" is <unk> here)
    assert all(r["question"] not in text for r in rows[:200] if len(r["question"]) > 20)
    assert any(r["question"] in text for r in rows[200:] if len(r["question"]) > 20)


def test_cli_prune_tiny_model(tmp_path, any_data, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_lm(tmp_path / "tiny")
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", model_dir, "--sparsity", "0.5", "--pruner", "wanda",
               "--allocation", "owl", "--calibration", "c4", "--calibration-samples", "4",
               "--seq-len", "48", "--save", str(out), "--data-dir", any_data, "--quiet",
               "--device", "cpu"])
    assert rc == 0
    rec = json.loads((out / PRUNE_RECORD).read_text())
    assert rec["pruner"] == "wanda" and rec["allocation"]["method"] == "owl"
    assert len(rec["layer_sparsities"]) == 2
    assert rec["calibration"]["samples"] == 4 and rec["calibration"]["seq_len"] == 48
    assert rec["calibration"]["source"].startswith(f"local:{any_data}")
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    model = AutoModelForCausalLM.from_pretrained(out)
    zeros = [float((m.weight == 0).float().mean()) for m in scored_matrices(model)]
    assert sum(zeros) / len(zeros) == pytest.approx(0.5, abs=0.05)
    # bad input: exit code 2, one line naming the problem
    bad = ["prune", "--model", model_dir, "--save", tmp_path / "x", "--data-dir", any_data]
    assert "[0, 1)" in fail(capsys, *bad, "--sparsity", "1.0")
    assert "3:2" in fail(capsys, *bad, "--sparsity", "0.5", "--pattern", "3:2")
    msg = fail(capsys, *bad, "--sparsity", "0.5", "--pattern", "2:4", "--allocation", "owl")
    assert "--allocation uniform" in msg
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    msg = fail(capsys, "prune", "--model", model_dir, "--sparsity", "0.5", "--save",
               tmp_path / "other", "--data-dir", any_data)  # foreign files
    assert "notes.txt" in msg and "--overwrite" in msg
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_cli_prune_smollm2_end_to_end(tmp_path, data_dir, smollm2):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smol"
    rc = main(["prune", "--model", "smollm2-135m", "--sparsity", "0.5", "--pruner", "wanda",
               "--calibration-samples", "2", "--seq-len", "16", "--save", str(out),
               "--data-dir", data_dir, "--quiet", "--device", "cpu"])
    assert rc == 0
    rec = load_record(out)
    assert rec["model"]["sha256"] == smollm2.identity["sha256"]
    assert len(rec["layer_sparsities"]) == 30 and rec["calibration"]["dataset"] == "c4"
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for m in scored_matrices(reloaded):  # Wanda: at least round(S * in) zeros in every row
        k = math.floor(0.5 * m.weight.shape[1] + 0.5)
        assert ((m.weight == 0).sum(1) >= k).all()
    scored = {m.name + ".weight" for m in scored_matrices(reloaded)}
    dense = smollm2.model.state_dict()
    saved = reloaded.state_dict()
    for name, value in dense.items():  # embeddings, norms, (tied) head untouched
        if name not in scored:
            assert torch.equal(saved[name], value), name
    # the in-memory architecture with the saved weights gives the reloaded model's logits
    model = copy.deepcopy(smollm2.model)
    model.load_state_dict(saved)
    ids = torch.tensor([list(range(100, 120))])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_mask_selection_equals_stable_sort_with_many_ties():
    from actpat.sparsity.masks import matrix_mask

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        r, c = torch.randint(1, 9, (2,), generator=g).tolist()
        scores = torch.randint(0, 4, (r, c), generator=g).float()
        s = torch.rand(1, generator=g).item() * 0.99
        k = math.floor(c * s + 0.5)
        ref = torch.zeros(r, c, dtype=torch.bool)
        if k:
            ref.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(row_mask(scores, s), ref)
        count = int(r * c * s)
        flat = torch.zeros(r * c, dtype=torch.bool)
        flat[torch.sort(scores.flatten(), stable=True).indices[:count]] = True
        assert torch.equal(matrix_mask(scores, count), flat.view(r, c))
