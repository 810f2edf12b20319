"""Resume and cache for long profiling runs.

Checkpoints: every ``every`` samples the sample loop writes its float32 accumulators and its
cursor to ``RUN/checkpoint/rank<r>.safetensors`` (the cursor, sample count, token count, batch
size and the run's key travel in the file's metadata, so one atomic rename publishes a
consistent state) plus a human-readable ``rank<r>.json`` beside it. The same command run again
finds the checkpoint, checks that it belongs to the same key and number of processes, and
continues from the cursor with the same batch boundaries, so the finished profile is identical
to an uninterrupted run. A finished run removes its checkpoint.

Cache: a profile is a function of its key -- the model (file hash, or hub revision, or a hash of
a local directory's weight files), the dataset, split, data source and sampled indices, the
sequence length, objective, seed, dtype and actpat's version. ``profile_key`` computes it; a
finished run records it in its ``summary.json`` and in an index under the cache directory, and a
later command with the same key reuses that profile (``--no-cache`` recomputes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UserError

CHECKPOINT_DIR = "checkpoint"


# --------------------------------------------------------------------------- checkpoints


@dataclass
class LoopState:
    """What the sample loop needs to continue: accumulated sums and where it stopped."""

    sums: dict[str, torch.Tensor]
    count: int  # samples accumulated
    tokens: int  # tokens scored
    cursor: int  # next position in this rank's list of samples
    batch_size: int


class Checkpointer:
    """Writes and reads one rank's ``LoopState`` under ``run_dir/checkpoint``."""

    def __init__(self, run_dir: str | Path, every: int = 16, key: str = "", rank: int = 0,
                 world_size: int = 1):
        if every < 1:
            raise UserError(f"--checkpoint-every must be at least 1 (got {every})")
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.every = every
        self.key = key
        self.rank = rank
        self.world_size = world_size
        self._last = 0

    @property
    def tensor_path(self) -> Path:
        return self.dir / f"rank{self.rank}.safetensors"

    @property
    def json_path(self) -> Path:
        return self.dir / f"rank{self.rank}.json"

    def due(self, cursor: int) -> bool:
        """True when ``cursor`` crossed a multiple of ``every`` since the last save."""
        return cursor // self.every > self._last // self.every

    def save(self, state: LoopState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"key": self.key, "world_size": self.world_size, "rank": self.rank,
                "count": state.count, "tokens": state.tokens, "cursor": state.cursor,
                "batch_size": state.batch_size, "version": __version__}
        tmp = self.tensor_path.with_name(self.tensor_path.name + ".tmp")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.sums.items()}
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, self.tensor_path)
        tmp_json = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_json, self.json_path)
        self._last = state.cursor

    def load(self, device: torch.device | str | None = None) -> LoopState | None:
        """The saved state, or None when there is none; refuses a checkpoint of another run."""
        if not self.tensor_path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.tensor_path), "pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            sums = load_file(str(self.tensor_path), device=str(device or "cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {self.tensor_path} is unreadable ({e}); delete "
                            f"{self.dir} to start over") from None
        if meta.get("key") != self.key:
            raise UserError(f"{self.dir} holds a checkpoint of a different profile (other model, "
                            "data, sampling or options); delete it or choose another --out")
        if meta.get("world_size") != self.world_size:
            raise UserError(f"{self.dir} was written by {meta.get('world_size')} processes, "
                            f"this run has {self.world_size}; resume with the same number of "
                            "processes or delete the checkpoint")
        self._last = int(meta["cursor"])
        return LoopState(sums, int(meta["count"]), int(meta["tokens"]), int(meta["cursor"]),
                         int(meta["batch_size"]))

    def clear(self) -> None:
        for p in (self.tensor_path, self.json_path):
            p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()  # only when no other rank's files are left
        except OSError:
            pass


# --------------------------------------------------------------------------- cache keys


def _fingerprint_file(path: Path, memo_dir: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so a big file is hashed once."""
    st = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / tag[:32]
    if memo.exists():
        return memo.read_text().strip()
    from ..models.loading import file_hash

    digest = file_hash(path)
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(memo.name + f".tmp{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(identity: dict, config=None) -> str:
    """What identifies the weights: the GGUF's sha256, a hash of a local directory's weight and
    config files, or the hub commit the weights were loaded from."""
    from ..models.loading import cache_dir

    if identity.get("sha256"):
        return "sha256:" + identity["sha256"]
    path = Path(str(identity.get("path", "")))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (
            p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(path)}={_fingerprint_file(p, cache_dir() / 'hashes')}\n"
                     .encode())
        return "dir-sha256:" + h.hexdigest()
    if path.is_file():
        return "sha256:" + _fingerprint_file(path, cache_dir() / "hashes")
    revision = getattr(config, "_commit_hash", None) if config is not None else None
    if revision:
        return f"hub:{identity.get('path')}@{revision}"
    return f"unversioned:{identity.get('path')}"  # a hub id without a known revision


def profile_key(model_fp: str, dataset: str, split, source: str, indices: list, seq_len: int,
                objective: str, seed: int, dtype: str, extra: dict | None = None) -> str:
    """The cache key of a profile (hex sha256 of the canonical JSON of its inputs)."""
    parts = {"model": model_fp, "dataset": dataset, "split": split, "source": source,
             "indices": list(indices), "seq_len": seq_len, "objective": objective, "seed": seed,
             "dtype": str(dtype), "actpat": __version__, **(extra or {})}
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cacheable(model_fp: str) -> bool:
    """Only results of identifiable weights are reused."""
    return not model_fp.startswith("unversioned:")


# --------------------------------------------------------------------------- the cache


class ProfileCache:
    """Index key -> run directory of a finished profile (``<cache>/profiles/index.json``)."""

    def __init__(self, root: str | Path | None = None):
        from ..models.loading import cache_dir

        self.root = Path(root) if root is not None else cache_dir() / "profiles"
        self.index = self.root / "index.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.index.read_text())
        except (OSError, ValueError):
            return {}

    def lookup(self, key: str, prefer: str | Path | None = None) -> Path | None:
        """A run directory holding a finished profile with this key (``prefer`` checked first)."""
        from .profiling import PROFILE_FILE

        candidates = [Path(prefer)] if prefer is not None else []
        known = self._read().get(key)
        if known:
            candidates.append(Path(known))
        for run in candidates:
            if (run / PROFILE_FILE).exists() and run_key(run) == key:
                return run
        return None

    def remember(self, key: str, run_dir: str | Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        index = self._read()
        index[key] = str(Path(run_dir).resolve())
        tmp = self.index.with_name(f"index.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, self.index)


def run_key(run_dir: str | Path) -> str | None:
    from .profiling import SUMMARY_FILE

    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text()).get("cache_key")
    except (OSError, ValueError):
        return None


def reuse(source: str | Path, out: str | Path) -> None:
    """Put a cached profile into ``out`` (hard links when possible, else copies)."""
    from .profiling import PROFILE_FILE, SUMMARY_FILE

    source, out = Path(source).resolve(), Path(out).resolve()
    if source == out:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in (PROFILE_FILE, SUMMARY_FILE):
        tmp = out / (name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source / name, tmp)
        except OSError:
            shutil.copyfile(source / name, tmp)
        os.replace(tmp, out / name)

