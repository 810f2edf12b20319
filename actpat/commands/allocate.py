"""actpat allocate: layer-wise sparsities S_i for a target S (METHOD.md section 4)."""

from __future__ import annotations

from ..cli import add_common
from ..errors import UserError

HELP = "compute per-layer sparsities (uniform, activation, owl, alphapruning) for a target S"


def add_allocation_arguments(p, method_flag: str = "--method", default: str = "uniform") -> None:
    """Options shared by `allocate` and `prune`: the allocator and what it needs."""
    from ..sparsity.allocation import ALLOCATORS

    p.add_argument(method_flag, default=default, choices=sorted(ALLOCATORS),
                   help=f"layer-wise allocation (default {default})")
    p.add_argument("--profile", default=None,
                   help="activation: a run from `actpat profile` on this model (else the "
                        "calibration data is profiled now, which needs --model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=float, default=None, help="activation: absolute threshold")
    g.add_argument("--gamma-quantile", type=float, default=None,
                   help="activation: share of weights counted as activated (default 0.1)")
    p.add_argument("--alpha", type=float, default=2.0, help="activation: sigmoid shift (2)")
    p.add_argument("--beta", type=float, default=0.2, help="activation: spread (0.2)")
    p.add_argument("--owl-m", type=float, default=5.0, help="owl: outlier multiple M (5)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="owl: lambda (0.08)")
    p.add_argument("--eps", type=float, default=0.3, help="alphapruning: epsilon (0.3)")
    p.add_argument("--profile-samples", type=int, default=64,
                   help="activation without --profile: calibration samples to profile (64)")


def add_calibration_arguments(p) -> None:
    p.add_argument("--calibration", default="c4",
                   help="calibration data: c4 (default), wikitext2, a QA set or a file")
    p.add_argument("--calibration-split", default="train", help="default: train (c4)")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    p.add_argument("--exclude-first", type=int, default=200,
                   help="QA calibration skips the first N records (the evaluated ones)")
    p.add_argument("--batch-size", type=int, default=8)


def load_calibration(args, lm):
    from ..data.calibration import calibration_sequences

    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of {context} "
                        "tokens; lower --seq-len")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    split = args.calibration_split
    from ..data.datasets import get_spec, is_path

    if not is_path(args.calibration) and get_spec(args.calibration).kind != "windows" \
            and split == "train":
        split = None  # QA sets: their usual split (the CLI default 'train' is c4's)
    return calibration_sequences(lm.tokenizer, args.calibration, args.calibration_samples,
                                 args.seq_len, args.seed, split, args.data_dir,
                                 args.exclude_first)


def calibration_info(args, samples) -> dict:
    return {"dataset": samples.dataset, "split": samples.split, "source": samples.source,
            "samples": len(samples.sequences), "seq_len": args.seq_len,
            "exclude_first": args.exclude_first, "indices": samples.indices}


def resolve_allocation(args, method: str, lm=None, samples=None) -> tuple[list[float], dict]:
    """(S_i, info) for the parsed options; ``lm``/``samples`` when a model is at hand."""
    from ..sparsity.allocation import activation_counts, allocate, check_sparsity

    sparsity = check_sparsity(args.sparsity)
    info = {"method": method, "sparsity": sparsity}
    kw = {}
    if method == "activation":
        info.update(alpha=args.alpha, beta=args.beta)
        seqs = None if samples is None else samples.sequences[:args.profile_samples]
        c, src = activation_counts(profile_dir=args.profile, lm=lm, calib_sequences=seqs,
                                   gamma=args.gamma, gamma_quantile=args.gamma_quantile,
                                   progress=not args.quiet)
        info["counts"] = src
        kw = {"counts": c.layer_counts, "layer_sizes": c.scored_per_layer}
    elif method == "owl":
        info.update(owl_m=args.owl_m, owl_lambda=args.owl_lambda)
        kw = {"owl_m": args.owl_m, "owl_lambda": args.owl_lambda,
              "batch_size": getattr(args, "batch_size", 8), "progress": not args.quiet}
    elif method == "alphapruning":
        info["eps"] = args.eps
        kw = {"eps": args.eps}
    if method in ("owl", "alphapruning") and lm is None:
        raise UserError(f"the {method} allocation needs the model: give --model")
    if method == "uniform" and lm is None and args.profile is None:
        raise UserError("the uniform allocation needs the layer count: give --model or --profile")
    if method == "uniform" and lm is None:
        from ..activation.profiling import Profile

        prof = Profile.load(args.profile)
        kw = {"num_layers": prof.num_layers}
    model = None if lm is None else lm.model
    calib = None if samples is None else samples.sequences
    s = allocate(method, sparsity, model=model, calib_inputs=calib, alpha=args.alpha,
                 beta=args.beta, **kw)
    info["layer_sparsities"] = s
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
    from ..sparsity.allocation import check_sparsity
    from ..activation.profiling import write_json

    check_sparsity(args.sparsity)
    lm = samples = None
    needs_model = args.method in ("owl", "alphapruning") or \
        (args.method == "activation" and args.profile is None)
    if needs_model and args.model is None:
        raise UserError(f"--method {args.method} needs --model"
                        + (" (or --profile RUN)" if args.method == "activation" else ""))
    if args.model is not None:
        from ..models.loading import load_model

        lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
        if args.method == "owl" or (args.method == "activation" and args.profile is None):
            samples = load_calibration(args, lm)
    s, info = resolve_allocation(args, args.method, lm, samples)
    if samples is not None:
        info["calibration"] = calibration_info(args, samples)
    info["seed"] = args.seed  # every output records its seed
    print(f"{args.method} allocation, S = {args.sparsity}")
    print("layer  S_i")
    for i, x in enumerate(s):
        print(f"{i:>5}  {x:.4f}")
    if args.json:
        write_json(args.json, info)
    if args.plot:
        from ..outputs.plots import plot_allocation

        plot_allocation({args.method: s}, args.plot, title=f"S = {args.sparsity}")
    return 0
