"""A fresh clone, as a user gets it: no ../shared beside it, no network, no offline variables.

The checkout's tracked files are copied into a temporary folder (nothing beside it), and the
README's first command, ``make demo``, runs there in quick mode with this test's interpreter
(``VENV`` points at it, so nothing is installed). The hub endpoint is a closed port, so the
demo must notice at once that the hub cannot be reached and run every step on the packaged texts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def clone_like(dest: Path) -> Path:
    """The files git tracks (and untracked, not ignored ones), as a clone would hold them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ACTPAT_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                        "TRANSFORMERS_OFFLINE", "MAKEFLAGS", "MAKELEVEL")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"))
    return env


def make(clone: Path, env: dict, *targets: str, **variables: str) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parent.parent
    # -o: the venv's install stamp is treated as up to date, so make installs nothing
    argv = ["make", "-o", f"{venv}/bin/actpat", f"VENV={venv}",
            *(f"{k}={v}" for k, v in variables.items()), *targets]
    return subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=3000)


def test_makefile_sets_no_data_dir_without_shared(tmp_path):
    clone = clone_like(tmp_path / "actpat")
    env = user_env(tmp_path)
    printed = subprocess.run(["make", "-p", "-n", "-o", "setup", "demo"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=120).stdout
    assert "ACTPAT_DATA_DIR" not in printed  # neither exported nor defined
    (tmp_path / "shared" / "data").mkdir(parents=True)  # a development checkout's layout
    printed = subprocess.run(["make", "-p", "-n", "-o", "setup", "demo"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=120).stdout
    assert f"ACTPAT_DATA_DIR := {tmp_path / 'shared' / 'data'}" in printed


@pytest.mark.slow
def test_make_demo_on_a_fresh_clone_offline(tmp_path):
    clone = clone_like(tmp_path / "actpat")
    env = user_env(tmp_path)
    env["ACTPAT_CACHE_DIR"] = os.environ.get("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    proc = make(clone, env, "demo", DEMO_ARGS="--quick --quiet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: built-in probe texts" in proc.stdout
    out = clone / "runs" / "demo"
    state = json.loads((out / "demo.json").read_text())
    assert state["data_mode"] == "probes"
    steps = state["steps"]
    for step in ("profiles", "figure1", "relatedness", "similarity", "allocation", "prune",
                 "eval", "report"):
        assert steps[step]["status"] == "done", (step, steps[step])
    page = (out / "report.html").read_text()
    for heading in ("Figure 1", "relatedness", "similarity", "allocation"):
        assert heading.lower() in page.lower(), heading
    assert "smoke run on packaged texts" in page.lower()
    smoke = json.loads((out / "eval" / "smoke.json").read_text())
    rows = {r["model"]: r for r in smoke["rows"]}
    assert {"dense", "wanda-uniform", "wanda-activation"} <= set(rows), list(rows)
    for name, r in rows.items():
        assert r["windows"] >= 1 and r["source"] == "package:probes/heldout.txt", (name, r)
        assert r["window_start"] == "stream"  # SmolLM2's tokenizer adds no BOS
    assert rows["dense"]["ppl"] < rows["wanda-uniform"]["ppl"]  # 50% pruning costs something
