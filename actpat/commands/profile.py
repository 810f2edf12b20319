"""actpat profile: a dataset's mean activation map (docs/method.md section 1)."""

from __future__ import annotations

from pathlib import Path

from .common import BUDGET_HELP, STREAM_HELP, add_common
from ..errors import UserError

HELP = "score every weight on a dataset's samples and save the mean activation map"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf path, directory or hub id")
    p.add_argument("--dataset", required=True, help="registered name or a .jsonl/.txt path")
    p.add_argument("--split", default=None, help="default: the dataset's usual split")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="longer texts keep their first tokens")
    p.add_argument("--batch-size", default="4",
                   help="samples per forward+backward, or 'auto': the largest that fits "
                        "--max-memory (an out-of-memory error halves the batch; default 4)")
    p.add_argument("--objective", default="max-logit", help="max-logit (paper) | nll")
    p.add_argument("--text-field", default="text", help="field of a local .jsonl file")
    p.add_argument("--template", default=None, help="e.g. 'Q: {question}\\nA:' for a .jsonl file")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--checkpoint-every", type=int, default=16, metavar="N",
                   help="save accumulators and the sample cursor to OUT/checkpoint every N "
                        "samples; the same command resumes from there (0: never; default 16)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute even if a finished profile with the same model, data, "
                        "sampling, seq len, objective, seed and version exists")
    p.add_argument("--max-memory", default=None,
                   help=BUDGET_HELP + "; it also bounds the peak for --batch-size auto, or the "
                        "weights kept on the compute device with --device-map auto (there also "
                        "'cuda:0=20GiB,cpu=60GiB'). Default: a safe share of the free memory")
    p.add_argument("--stream-layers", action="store_true", help=STREAM_HELP + "; the "
                   "accumulators live in OUT/stream between batches and a re-run resumes there")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="spread the model over GPU / CPU / disk with accelerate (models larger "
                        "than one device)")
    add_common(p)


def run(args) -> int:
    from ..activation.distributed import Ranks, launched
    from ..models.memory import parse_batch_size, parse_size

    if args.samples <= 0:
        raise UserError(f"--samples must be at least 1 (got {args.samples})")
    from ..data.datasets import get_spec, is_path

    if not is_path(args.dataset):
        get_spec(args.dataset)  # an unknown name fails before the model is loaded
    args.batch_size = parse_batch_size(args.batch_size)
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0 (got {args.checkpoint_every})")
    budget = None
    if args.max_memory and args.device_map is None:
        if "=" in args.max_memory:
            raise UserError("per-device --max-memory lists need --device-map auto; give one size")
        budget = parse_size(args.max_memory)
    if args.stream_layers and args.device_map:
        raise UserError("--stream-layers and --device-map auto are two ways to run a model "
                        "larger than memory; give one")
    if Ranks.from_env().enabled and args.device_map:
        raise UserError("--device-map auto runs in one process; drop torchrun/accelerate launch "
                        "or --device-map")
    with launched(args.device) as (ctx, device):
        return _run(args, ctx, device, budget)


def _run(args, ctx, device, budget) -> int:
    from ..activation.distributed import barrier
    from ..models.loading import load_model
    from ..activation.profiling import PROFILE_FILE, SUMMARY_FILE
    from ..runs import prepare_out_dir

    if ctx.is_main:  # other ranks wait: rank 0 alone checks and creates --out
        prepare_out_dir(args.out, args.overwrite, owned=(PROFILE_FILE, SUMMARY_FILE, "checkpoint",
                                                         "stream", PROFILE_FILE + ".tmp"))
    barrier(ctx)
    out = Path(args.out)
    from ..data.datasets import require_records

    require_records(args.dataset, args.split, args.data_dir)
    if args.device_map is None:
        import sys

        from ..models.streamed import choose_engine, open_streamed

        stream, why = choose_engine(args.model, args.dtype, args.stream_layers, budget, True)
        if stream:
            if why and why != "--stream-layers" and not args.quiet:
                print(why, file=sys.stderr)
            sm = open_streamed(args.model, args.dtype, args.trust_remote_code)
            return _profile(args, ctx, sm, out, budget)
    if args.device_map:
        import tempfile

        from ..models.offload import load_dispatched

        with tempfile.TemporaryDirectory(prefix="actpat-offload-") as offload_dir:
            lm = load_dispatched(args.model, args.dtype, args.max_memory, offload_dir,
                                 args.trust_remote_code)
            return _profile(args, ctx, lm, out, budget)
    lm = load_model(args.model, device, args.dtype, args.trust_remote_code)
    return _profile(args, ctx, lm, out, budget)


def _profile(args, ctx, lm, out, budget) -> int:
    from ..activation.cache import profile_run
    from ..activation.profiling import PROFILE_FILE

    run = profile_run(lm, args.dataset, out, samples=args.samples, seq_len=args.seq_len,
                      seed=args.seed, split=args.split, data_dir=args.data_dir,
                      text_field=args.text_field, template=args.template,
                      objective=args.objective, batch_size=args.batch_size, dtype=args.dtype,
                      use_cache=not args.no_cache, checkpoint_every=args.checkpoint_every,
                      dist=ctx, max_memory=budget, progress=not args.quiet)
    if not ctx.is_main:
        return 0
    if run.reused is not None:
        print(f"reused the cached profile of the same model, data, sampling and options "
              f"({run.reused}) -> {out}/{PROFILE_FILE}; --no-cache recomputes")
        return 0
    m = run.profile.meta
    print(f"profiled {m['samples']} samples ({m['tokens_scored']} tokens) of {args.dataset} "
          f"[{run.samples.source}] in {m['wall_time_s']:.1f}s -> {out}/{PROFILE_FILE}")
    return 0
