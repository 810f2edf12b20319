"""Run directories and artifacts: refuse to overwrite foreign content, atomic JSON, versions."""

from __future__ import annotations

import json
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


def run_pairs_command(args, owned: tuple[str, ...], compute, write) -> int:
    """The frame of a command that scores pairs (``similarity``, ``sts``), on one or N ranks.

    Under torchrun / accelerate launch every rank joins the process group and loads the model;
    ``compute(lm, progress)`` shares the pairs out (``actpat.distributed``) and returns the full
    result on every rank; only rank 0 checks ``--out`` and calls ``write(result, out)``.
    """
    from .activation.distributed import barrier, launched
    from .models.loading import load_model

    with launched(args.device) as (ctx, device):
        if ctx.is_main:
            prepare_out_dir(args.out, args.overwrite, owned=owned)
        barrier(ctx)
        lm = load_model(args.model, device, args.dtype, args.trust_remote_code)
        result = compute(lm, not args.quiet and ctx.is_main)
        if ctx.is_main:
            result["world_size"] = ctx.world_size
            write(result, args.out)
        barrier(ctx)
    return 0


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"actpat": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
