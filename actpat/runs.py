"""Where actpat writes: run directories (refuse foreign content), atomic JSON, library versions,
the cache root (``ACTPAT_CACHE_DIR``) and the file hashes that key cache entries."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from .errors import UserError


def prepare_out_dir(path: str | Path, overwrite: bool = False, owned: tuple[str, ...] = ()) -> Path:
    """Create ``path``; refuse when it holds files other than ``owned`` unless ``overwrite``.

    Files named in ``owned`` (this command's own outputs and checkpoints) may be there: a re-run
    or a resumed run writes over them.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a directory")
    if path.exists() and not overwrite:
        foreign = [p.name for p in path.iterdir() if p.name not in owned]
        if foreign:
            raise UserError(f"--out {path} already holds other files ({', '.join(sorted(foreign)[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); choose a new directory or "
                            "pass --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def versions() -> dict:
    import torch
    import transformers

    from .version import __version__

    return {"actpat": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def cache_dir() -> Path:
    root = os.environ.get("ACTPAT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actpat"


def file_hash(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
