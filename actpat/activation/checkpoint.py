"""Resume and cache for long profiling runs.

Checkpoints: every ``every`` samples the sample loop writes its float32 accumulators and its
cursor to ``RUN/checkpoint/rank<r>.safetensors`` (the cursor, sample count, token count, batch
size and the run's key travel in the file's metadata, so one atomic rename publishes a
consistent state) plus a human-readable ``rank<r>.json`` beside it. The same command run again
finds the checkpoint, checks that it belongs to the same key and number of processes, and
continues from the cursor with the same batch boundaries, so the finished profile is identical
to an uninterrupted run. A finished run removes its checkpoint.

The cache of finished profiles is ``activation.cache``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..version import __version__
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
