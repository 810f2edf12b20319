"""Checkpoints, resume after kill -9, and the profile cache (hits and misses on key changes)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import actpat.activation.profiling as profile_mod
from actpat.activation.checkpoint import Checkpointer, LoopState
from actpat.activation.cache import cacheable, profile_key
from actpat.cli import main
from actpat.errors import UserError
from actpat.activation.profiling import Profile, compute_profile
from helpers import LM, PROSE, QUESTIONS, ROOT, assert_same_tensors
from helpers import random_lengths_sequences as _seqs
from tiny import tiny_model
from tinylm import save_tiny_lm


def _assert_identical(a: Profile, b: Profile):
    assert list(a.maps) == list(b.maps)
    assert_same_tensors(a.maps, b.maps)


class _Killed(Exception):
    pass


def test_library_resume_is_identical_to_uninterrupted(tmp_path, monkeypatch):
    model, seqs = tiny_model("gpt2"), _seqs(9)
    whole = compute_profile(LM(model), seqs, 2, progress=False)
    orig, calls = profile_mod.score_batch, {"n": 0}

    def dies_on_fourth_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Killed
        return orig(*a, **k)

    monkeypatch.setattr(profile_mod, "score_batch", dies_on_fourth_batch)
    with pytest.raises(_Killed):
        compute_profile(LM(model), seqs, 2, progress=False,
                        checkpoint=Checkpointer(tmp_path, every=4, key="k"))
    state = json.loads((tmp_path / "checkpoint" / "rank0.json").read_text())
    assert state["cursor"] == 4 and state["count"] == 4  # batches 1-2 saved, batch 3 lost
    monkeypatch.setattr(profile_mod, "score_batch", orig)
    resumed = compute_profile(LM(model), seqs, 2, progress=False,
                              checkpoint=Checkpointer(tmp_path, every=4, key="k"))
    assert resumed.meta["resumed_at_sample"] == 4
    assert resumed.meta["tokens_scored"] == whole.meta["tokens_scored"]
    _assert_identical(resumed, whole)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    ck = Checkpointer(tmp_path, every=2, key="a")
    ck.save(LoopState({"x": torch.ones(2)}, count=2, tokens=8, cursor=2, batch_size=2))
    with pytest.raises(UserError, match="different profile"):
        Checkpointer(tmp_path, every=2, key="b").load()
    with pytest.raises(UserError, match="processes"):
        Checkpointer(tmp_path, every=2, key="a", world_size=2).load()
    state = Checkpointer(tmp_path, every=2, key="a").load()
    assert state.cursor == 2 and torch.equal(state.sums["x"], torch.ones(2))
    with pytest.raises(UserError):
        Checkpointer(tmp_path, every=0)


_SLOW_CLI = """
import sys, time
import actpat.activation.profiling as P
orig = P.score_batch
def slow(*a, **k):
    time.sleep(0.4)
    return orig(*a, **k)
P.score_batch = slow
from actpat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_then_same_command_resumes_to_identical_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = save_tiny_lm(tmp_path / "lm", "llama")
    args = ["profile", "--model", model_dir, "--dataset", str(PROSE), "--samples", "16",
            "--seq-len", "40", "--batch-size", "2", "--checkpoint-every", "2", "--device", "cpu",
            "--quiet"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args, "--out", str(run)],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run / "checkpoint" / "rank0.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if marker.exists() and json.loads(marker.read_text())["cursor"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"finished or failed before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "profile.safetensors").exists()
    cursor = json.loads(marker.read_text())["cursor"]
    assert 4 <= cursor < 16

    assert main([*args, "--out", str(run)]) == 0  # the same command again
    resumed = Profile.load(run)
    assert resumed.meta["resumed_at_sample"] >= 4
    assert not (run / "checkpoint").exists()
    assert main([*args, "--out", str(tmp_path / "whole"), "--no-cache"]) == 0
    whole = Profile.load(tmp_path / "whole")
    assert "resumed_at_sample" not in whole.meta
    assert resumed.meta["tokens_scored"] == whole.meta["tokens_scored"]
    assert resumed.meta["sample_indices"] == whole.meta["sample_indices"]
    _assert_identical(resumed, whole)


def test_profile_key_changes_with_every_field():
    base = dict(model_fp="sha256:1", dataset="c4", split="validation", source="local:x",
                indices=[1, 2], seq_len=64, objective="max-logit", seed=0, dtype="float32")
    k0 = profile_key(**base)
    assert profile_key(**base) == k0
    for field, value in [("model_fp", "sha256:2"), ("dataset", "boolq"), ("split", "train"),
                         ("indices", [1, 3]), ("seq_len", 128), ("objective", "nll"),
                         ("seed", 1), ("dtype", "bfloat16"), ("source", "hub:x")]:
        assert profile_key(**dict(base, **{field: value})) != k0, field
    assert cacheable("sha256:1") and not cacheable("unversioned:some/hub-id")


def test_cache_hits_on_same_key_and_misses_on_changes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = save_tiny_lm(tmp_path / "lm", "llama")
    base = ["profile", "--model", model_dir, "--dataset", str(PROSE), "--samples", "3",
            "--seq-len", "24", "--device", "cpu", "--quiet"]

    def run(out, *extra):
        capsys.readouterr()
        assert main([*base, "--out", str(tmp_path / out), *extra]) == 0
        text = capsys.readouterr().out
        assert ("reused" in text) != ("profiled" in text), text
        return "reused" in text

    assert not run("a")
    assert run("b")  # same key, another directory: reused, identical files
    _assert_identical(Profile.load(tmp_path / "b"), Profile.load(tmp_path / "a"))
    assert run("a")  # the same command in place
    assert not run("c", "--no-cache")
    assert not run("d", "--seed", "1")
    assert not run("e", "--seq-len", "20")
    assert not run("f", "--objective", "nll")
    assert not run("g", "--samples", "2")
    assert not run("h", "--dtype", "bfloat16")
    capsys.readouterr()
    assert main(["profile", *base[1:4], str(QUESTIONS), *base[5:], "--out",
                 str(tmp_path / "i")]) == 0
    assert "profiled" in capsys.readouterr().out
    save_tiny_lm(model_dir, "llama", seed=1)  # other weights in the same directory
    assert not run("j")
    assert run("k")  # ... and now those are cached
