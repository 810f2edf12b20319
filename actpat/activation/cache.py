"""The cache of finished profiles, and the profiling run a command asks for.

A profile is a function of its key -- the model (file hash, or hub revision, or a hash of
a local directory's weight files), the dataset, split, data source and sampled indices, the
sequence length, objective, seed, dtype and actpat's version. ``profile_key`` computes it; a
finished run records it in its ``summary.json`` and in an index under the cache directory, and a
later command with the same key reuses that profile (``--no-cache`` recomputes).

``profile_run`` is the whole ``actpat profile`` job as a library function: sample, look the key
up in the cache, else compute (with checkpoints and shards) and remember it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..version import __version__
from .profiling import PROFILE_FILE, SUMMARY_FILE


# --------------------------------------------------------------------------- cache keys


def _fingerprint_file(path: Path, memo_dir: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so a big file is hashed once."""
    st = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / tag[:32]
    if memo.exists():
        return memo.read_text().strip()
    from ..runs import file_hash

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
    from ..runs import cache_dir

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
        from ..runs import cache_dir

        self.root = Path(root) if root is not None else cache_dir() / "profiles"
        self.index = self.root / "index.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.index.read_text())
        except (OSError, ValueError):
            return {}

    def lookup(self, key: str, prefer: str | Path | None = None) -> Path | None:
        """A run directory holding a finished profile with this key (``prefer`` checked first)."""
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
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text()).get("cache_key")
    except (OSError, ValueError):
        return None


def reuse(source: str | Path, out: str | Path) -> None:
    """Put a cached profile into ``out`` (hard links when possible, else copies)."""
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


# --------------------------------------------------------------------------- a profiling run


@dataclass
class ProfileRun:
    """What ``profile_run`` did: the profile (None on ranks other than 0), the cached run it
    reused (None when computed), and the samples it scored."""

    profile: object | None
    reused: Path | None
    samples: object


def profile_run(lm, dataset: str, out: str | Path, *, samples: int = 64, seq_len: int = 256,
                seed: int = 0, split: str | None = None, data_dir: str | None = None,
                text_field: str = "text", template: str | None = None,
                objective: str = "max-logit", batch_size: int | str = 4, dtype: str = "float32",
                use_cache: bool = True, checkpoint_every: int = 0, dist=None,
                max_memory: int | None = None, progress: bool = True) -> ProfileRun:
    """Profile ``samples`` sequences of ``dataset`` on ``lm`` into the run directory ``out``.

    A finished profile with the same key (model, data, sampling, options, version) is reused
    from the cache unless ``use_cache`` is False; ``checkpoint_every`` N saves a resumable state
    every N samples; ``dist`` (``distributed.Ranks``) shares the samples out over processes.
    """
    from ..data.datasets import sample_sequences
    from ..errors import UserError
    from .checkpoint import Checkpointer
    from .distributed import barrier, current, gather_objects
    from .profiling import compute_profile, input_device

    dist = dist or current()
    out = Path(out)
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {context} "
                        "tokens; lower --seq-len")
    drawn = sample_sequences(lm.tokenizer, dataset, samples, seq_len, seed, split, data_dir,
                             text_field, template)
    meta = {"model": lm.identity, "dataset": dataset, "split": drawn.split,
            "data_source": drawn.source, "seq_len": seq_len, "seed": seed,
            "sample_indices": drawn.indices, "window_start": drawn.window_start,
            "dtype": dtype,
            "device": str(input_device(lm.model))}
    if (lm.identity or {}).get("device_map"):
        meta["device_map"] = lm.identity.get("device_map")
    fingerprint = model_fingerprint(lm.identity, lm.model.config)
    key = profile_key(fingerprint, dataset, drawn.split, drawn.source, drawn.indices, seq_len,
                      objective, seed, dtype, {"text_field": text_field, "template": template})
    meta.update(model_fingerprint=fingerprint, cache_key=key)
    cache = ProfileCache()
    hit = None
    if use_cache and cacheable(fingerprint):
        hit = gather_objects(cache.lookup(key, prefer=out) if dist.is_main else None, dist)[0]
    if hit is not None:
        if dist.is_main:
            reuse(hit, out)
        return ProfileRun(None, Path(hit), drawn)
    checkpoint = None
    if getattr(lm, "streamed", False):  # models.streamed.StreamedModel: one layer at a time
        from .streaming import profile_streamed

        if dist.enabled:
            raise UserError("--stream-layers runs in one process; drop torchrun / accelerate "
                            "launch")
        profile = profile_streamed(lm, drawn.sequences, out, key, batch_size, objective, meta,
                                   progress=progress, max_memory=max_memory)
    else:
        if checkpoint_every:
            checkpoint = Checkpointer(out, checkpoint_every, key, dist.rank, dist.world_size)
        profile = compute_profile(lm, drawn.sequences, batch_size, objective, meta,
                                  progress=progress and dist.is_main, checkpoint=checkpoint,
                                  dist=dist, max_memory=max_memory)
    if dist.is_main:
        profile.save(out)
        if cacheable(fingerprint):
            cache.remember(key, out)
    barrier(dist)
    if checkpoint is not None:
        checkpoint.clear()
    return ProfileRun(profile if dist.is_main else None, None, drawn)
