"""What the commands share: the common options and the frame of a pair-scoring command."""

from __future__ import annotations

import argparse
import os

BUDGET_HELP = ("memory budget of the run (e.g. 6GB), the process's resident memory. When the "
               "model in --dtype (plus, for profile, its float32 maps: 4 bytes per scored "
               "weight) would not fit it, the run streams decoder layers from disk (as "
               "--stream-layers, on the CPU), whose peak is one layer, the embeddings and LM "
               "head, and the fixed overhead of Python + torch + tokenizer (~0.7-0.9 GB), and "
               "does not grow with the number of layers")
STREAM_HELP = ("keep weights in the checkpoint's safetensors files and hold one decoder layer in "
               "memory at a time, computing on the CPU (models larger than memory; same results "
               "as in memory; needs "
               "a local safetensors directory, an alias or a .gguf)")


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Options every command shares (docs/architecture.md: the command-line contract)."""
    p.add_argument("--data-dir", default=os.environ.get("ACTPAT_DATA_DIR"),
                   help="folder with <dataset>/<split>.jsonl|.txt (default: $ACTPAT_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if model:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
        p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow a hub model's own code to run (off by default)")


def add_stream_arguments(p) -> None:
    """``--max-memory`` and ``--stream-layers`` of the pair-scoring commands."""
    p.add_argument("--max-memory", default=None, help=BUDGET_HELP)
    p.add_argument("--stream-layers", action="store_true", help=STREAM_HELP)


def run_pairs_command(args, owned: tuple[str, ...], compute, write) -> int:
    """The frame of a command that scores pairs (``similarity``, ``sts``), on one or N ranks.

    With ``--stream-layers`` (or a ``--max-memory`` the model exceeds) ``lm`` is a
    ``StreamedModel``: one decoder layer in memory, one process.
    Under torchrun / accelerate launch every rank joins the process group and loads the model;
    ``compute(lm, progress)`` shares the pairs out (``activation.distributed``) and returns the full
    result on every rank; only rank 0 checks ``--out`` and calls ``write(result, out)``.
    """
    import sys

    from ..activation.distributed import barrier, launched
    from ..errors import UserError
    from ..models.loading import load_model
    from ..models.memory import parse_size
    from ..models.streamed import choose_engine, open_streamed
    from ..runs import prepare_out_dir

    budget = parse_size(args.max_memory) if getattr(args, "max_memory", None) else None
    stream, why = choose_engine(args.model, args.dtype, getattr(args, "stream_layers", False),
                                budget, False)
    with launched(args.device) as (ctx, device):
        if stream and ctx.world_size > 1:
            raise UserError("the streamed engine runs in one process; drop torchrun or "
                            "--stream-layers / --max-memory")
        if ctx.is_main:
            prepare_out_dir(args.out, args.overwrite, owned=owned)
        barrier(ctx)
        if stream:
            if why != "--stream-layers" and not args.quiet:
                print(why, file=sys.stderr)
            lm = open_streamed(args.model, args.dtype, args.trust_remote_code)
        else:
            lm = load_model(args.model, device, args.dtype, args.trust_remote_code)
        result = compute(lm, not args.quiet and ctx.is_main)
        if ctx.is_main:
            result["world_size"] = ctx.world_size
            write(result, args.out)
        barrier(ctx)
    return 0
