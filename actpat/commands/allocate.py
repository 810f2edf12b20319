"""actpat allocate: layer-wise sparsities S_i for a target S (docs/method.md section 4)."""

from __future__ import annotations

from .common import add_common
from ..errors import UserError

HELP = "compute per-layer sparsities (an allocator: uniform, activation, owl, ...) for a target S"


def add_allocation_arguments(p, method_flag: str = "--method", default: str = "uniform") -> None:
    """Options shared by `allocate` and `prune`: the allocator and what it needs, read from the
    allocator registry (one flag per allocator option; the counts flags when one needs counts)."""
    from ..sparsity.allocators import ALLOCATORS

    p.add_argument(method_flag, default=default, choices=sorted(ALLOCATORS),
                   help=f"layer-wise allocation (default {default})")
    p.add_argument("--profile", default=None,
                   help="activation: a run from `actpat profile` on this model (else the "
                        "calibration data is profiled now, which needs --model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=float, default=None, help="activation: absolute threshold")
    g.add_argument("--gamma-quantile", type=float, default=None,
                   help="activation: share of weights counted as activated (default 0.1)")
    seen = set()
    for entry in ALLOCATORS.values():
        for o in entry.options:
            if o.name not in seen:
                seen.add(o.name)
                p.add_argument("--" + o.name.replace("_", "-"), type=float, default=o.default,
                               help=o.help)
    p.add_argument("--profile-samples", type=int, default=64,
                   help="activation without --profile: calibration samples to profile (64)")


def allocation_needs(args, method: str) -> set[str]:
    """What the chosen allocator needs loaded: "model", "calibration" (counts without --profile
    are profiled on the calibration data)."""
    from ..sparsity.allocators import ALLOCATORS

    needs = set(ALLOCATORS.get(method).needs)
    if "held" in needs:
        needs |= {"model", "calibration"}
    if "counts" in needs and args.profile is None:
        needs |= {"model", "calibration"}
    if "calibration" in needs:
        needs.add("model")
    return needs


def add_calibration_arguments(p) -> None:
    p.add_argument("--calibration", default="c4",
                   help="calibration data: c4 (default), wikitext2, a QA set or a file")
    p.add_argument("--calibration-split", default="train", help="default: train (c4)")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    p.add_argument("--exclude-first", type=int, default=200,
                   help="QA calibration skips the first N records (the evaluated ones)")
    p.add_argument("--batch-size", type=int, default=8)


def held_count(args, method: str) -> int:
    """How many held-apart calibration windows the allocator ``method`` needs (0: none)."""
    from ..sparsity.allocators import ALLOCATORS

    if "held" not in ALLOCATORS.get(method).needs:
        return 0
    if args.held_windows < 1:
        raise UserError(f"--held-windows must be at least 1 (got {args.held_windows:g})")
    return int(args.held_windows)


def load_calibration(args, lm, held: int = 0):
    from ..data.calibration import calibration_sequences

    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of {context} "
                        "tokens; lower --seq-len")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    return calibration_sequences(lm.tokenizer, args.calibration, args.calibration_samples + held,
                                 args.seq_len, args.seed, calibration_split(args),
                                 args.data_dir, args.exclude_first)


def calibration_split(args) -> str | None:
    from ..data.datasets import get_spec, is_path

    split = args.calibration_split
    if not is_path(args.calibration) and get_spec(args.calibration).kind != "windows" \
            and split == "train":
        split = None  # QA sets: their usual split (the CLI default 'train' is c4's)
    return split


def require_calibration(args) -> None:
    """Fail before the model loads when the calibration data can be read from nowhere."""
    from ..data.datasets import require_records

    require_records(args.calibration, calibration_split(args), args.data_dir)


def calibration_info(args, samples) -> dict:
    return {"dataset": samples.dataset, "split": samples.split, "source": samples.source,
            "samples": len(samples.sequences), "seq_len": args.seq_len,
            "window_start": samples.window_start,
            "exclude_first": args.exclude_first, "indices": samples.indices}


def resolve_allocation(args, method: str, lm=None, samples=None,
                       held=None) -> tuple[list[float], dict]:
    """(S_i, info) for the parsed options; ``lm``/``samples`` when a model is at hand;
    ``held``: the held-apart calibration windows (``split_held``) when the allocator needs them."""
    from ..sparsity.allocators import ALLOCATORS, allocation_with_record

    options = {o.name: getattr(args, o.name) for o in ALLOCATORS.get(method).options}
    s, info = allocation_with_record(
        method, args.sparsity, lm=lm,
        calib_sequences=None if samples is None else samples.sequences,
        profile_dir=args.profile, gamma=args.gamma, gamma_quantile=args.gamma_quantile,
        options=options, profile_samples=args.profile_samples,
        batch_size=getattr(args, "batch_size", 8), progress=not args.quiet,
        held_sequences=None if held is None else held.sequences)
    if held is not None:
        info["held_windows"] = {"dataset": held.dataset, "split": held.split,
                                "samples": len(held.sequences), "indices": held.indices}
    return s, info


def add_arguments(p) -> None:
    p.add_argument("--sparsity", type=float, required=True, help="target S in [0, 1)")
    add_allocation_arguments(p)
    p.add_argument("--model", default=None,
                   help="needed by owl, alphapruning, and activation without --profile")
    add_calibration_arguments(p)
    p.add_argument("--json", default=None, help="write the allocation here")
    p.add_argument("--plot", default=None, help="write S_i per layer (PNG) here")
    add_common(p)


def run(args) -> int:
    from ..runs import write_json
    from ..sparsity.allocators import ALLOCATORS
    from ..sparsity.allocation_search import split_held
    from ..sparsity.masks import validate_sparsity

    validate_sparsity(args.sparsity)
    lm = samples = None
    needs = allocation_needs(args, args.method)
    if "model" in needs and args.model is None:
        raise UserError(f"--method {args.method} needs --model"
                        + (" (or --profile RUN)" if ALLOCATORS.get(args.method).needs ==
                           {"counts"} else ""))
    if args.model is not None:
        from ..models.loading import load_model

        if "calibration" in needs:
            require_calibration(args)
        lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
        if "calibration" in needs:
            samples = load_calibration(args, lm, held_count(args, args.method))
    samples, held = split_held(samples, held_count(args, args.method))
    s, info = resolve_allocation(args, args.method, lm, samples, held)
    if samples is not None:
        info["calibration"] = calibration_info(args, samples)
    info["seed"] = args.seed  # every output records its seed
    print(f"{args.method} allocation, S = {args.sparsity}")
    per_matrix = getattr(s, "per_matrix", None)
    types = list(per_matrix or {})
    print("layer  S_i" + "".join(f"  {t:>6}" for t in types))
    for i, x in enumerate(s):
        print(f"{i:>5}  {x:.4f}" + "".join(f"  {per_matrix[t][i]:.4f}" for t in types))
    if args.json:
        write_json(args.json, info)
    if args.plot:
        from ..outputs.plots import plot_allocation

        plot_allocation({args.method: s}, args.plot, title=f"S = {args.sparsity}")
    return 0
