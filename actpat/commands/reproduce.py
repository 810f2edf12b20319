"""actpat reproduce: the paper's experiments end to end, resumable, results as JSON per step."""

from __future__ import annotations

from pathlib import Path

from .common import add_common
from ..errors import UserError

HELP = "reproduce an experiment: fig1 | similarity | relatedness | table1 | calibration | sts"

EXPERIMENTS = ("fig1", "similarity", "relatedness", "table1", "calibration", "sts")
FIG1_DATASETS = "c4,wikitext2,boolq,piqa,siqa,hellaswag,mmlu"


def add_arguments(p) -> None:
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--model", default="smollm2-135m", help="default smollm2-135m")
    p.add_argument("--out", required=True, help="run directory (re-running resumes it)")
    g = p.add_argument_group("profiles (fig1, similarity, sts)")
    g.add_argument("--datasets", default=None,
                   help=f"fig1: profiled datasets (default {FIG1_DATASETS}); calibration: "
                        "calibration sets (default boolq,mmlu,siqa,hellaswag,c4)")
    g.add_argument("--samples", type=int, default=None,
                   help="fig1: samples per dataset (64); similarity: pairs (32); sts: pairs (256)")
    g.add_argument("--runs", nargs="*", default=None, help="relatedness: profile run dirs")
    g.add_argument("--sts-dataset", default="stsb", choices=("stsb", "sick"))
    g = p.add_argument_group("pruning (table1, calibration)")
    g.add_argument("--seq-len", type=int, default=256,
                   help="perplexity windows and fig1 samples (default 256)")
    g.add_argument("--windows", type=int, default=100, help="perplexity: first N windows (100)")
    g.add_argument("--zero-shot-limit", type=int, default=200, help="first N items per task (200)")
    g.add_argument("--calibration-samples", type=int, default=64)
    g.add_argument("--calibration-seq-len", type=int, default=256)
    g.add_argument("--sparsities", default="0.5,0.6,0.7")
    g.add_argument("--seeds", default="0,1,2", help="table1: calibration seeds of Wanda rows")
    g.add_argument("--allocations", default="uniform,activation,owl,alphapruning",
                   help="table1: the Wanda allocations compared at every sparsity (default "
                        "uniform,activation,owl,alphapruning; add atp,dlp,search)")
    g.add_argument("--seeded-allocations", default="uniform,activation",
                   help="table1: the Wanda allocations run with every --seeds (default "
                        "uniform,activation)")
    g.add_argument("--profile", default=None,
                   help="counts profile for the activation allocation (default: profile the "
                        "seed-0 calibration windows once, saved in OUT/counts-profile)")
    g.add_argument("--profile-samples", type=int, default=64,
                   help="calibration windows profiled for the counts (default 64)")
    g.add_argument("--gamma-quantile", type=float, default=0.1,
                   help="share of weights counted as activated (default 0.1)")
    g.add_argument("--only", default=None,
                   help="comma-separated configuration names (see --plan) to run, in that order")
    g.add_argument("--relate", default=None, metavar="FILE",
                   help="calibration: a relatedness JSON (`actpat relate --json`) to correlate "
                        "accuracy with dataset relatedness in OUT/calibration.json")
    g.add_argument("--tasks", default=None,
                   help="zero-shot tasks of the zero-shot rows (default: boolq,piqa,siqa,"
                        "hellaswag,mmlu); a subset gives rows of other names: use another --out")
    g.add_argument("--no-zero-shot", action="store_true", help="table1: perplexity rows only")
    g.add_argument("--plan", action="store_true", help="print the configurations and exit")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_common(p)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated numbers (got '{text}')") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated integers (got '{text}')") from None


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.experiment in ("table1", "calibration"):
        return _pruning(args)
    if args.experiment == "fig1":
        return _fig1(args)
    try:
        from ..experiments import similarity as sim
    except ImportError:
        raise UserError(f"`reproduce {args.experiment}` needs actpat.experiments_similarity, "
                        "which this installation lacks; use `actpat similarity|relate|sts`") \
            from None
    out = Path(args.out)
    if args.experiment == "relatedness":
        if not args.runs:
            raise UserError("reproduce relatedness needs --runs RUN [RUN ...] (profile run "
                            "directories, e.g. from `actpat reproduce fig1`)")
        sim.reproduce_relatedness(args.runs, out)
        return 0
    from ..models.loading import load_model

    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    if args.experiment == "similarity":
        sim.reproduce_similarity(lm, out, pairs=args.samples or 32, seed=args.seed,
                                 data_dir=args.data_dir, progress=not args.quiet)
    else:
        sim.reproduce_sts(lm, out, dataset=args.sts_dataset, samples=args.samples or 256,
                          seed=args.seed, data_dir=args.data_dir, progress=not args.quiet)
    return 0


def _pruning(args) -> int:
    from ..evaluation.evaluate import parse_tasks
    from ..experiments.runner import reproduce_calibration, reproduce_table1
    from ..experiments.tables import write_calibration_summary
    from ..experiments.plan import ZERO_SHOT, Settings, calibration_configs, table1_configs

    for name in ("windows", "zero_shot_limit", "calibration_samples", "profile_samples",
                 "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    settings = Settings(model=args.model, data_dir=args.data_dir, device=args.device,
                        dtype=args.dtype, seq_len=args.seq_len, windows=args.windows,
                        zero_shot_limit=args.zero_shot_limit,
                        calib_samples=args.calibration_samples,
                        calib_seq_len=args.calibration_seq_len,
                        gamma_quantile=args.gamma_quantile, profile_dir=args.profile,
                        profile_samples=min(args.profile_samples, args.calibration_samples),
                        batch_size=args.batch_size, progress=not args.quiet)
    sparsities = _floats(args.sparsities, "sparsities")
    tasks = tuple(parse_tasks(args.tasks, ZERO_SHOT, "zero-shot task")) if args.tasks \
        else ZERO_SHOT
    if args.experiment == "table1":
        seeded = tuple(a.strip() for a in args.seeded_allocations.split(",") if a.strip())
        allocations = tuple(a.strip() for a in args.allocations.split(",") if a.strip())
        from ..sparsity.allocators import ALLOCATORS

        for flag, names in (("seeded-allocations", seeded), ("allocations", allocations)):
            bad = [a for a in names if a not in ALLOCATORS]
            if bad:
                raise UserError(f"--{flag}: unknown allocation '{bad[0]}'; use some of "
                                f"{','.join(ALLOCATORS)}")
        plan = table1_configs(sparsities, _ints(args.seeds, "seeds"),
                              zero_shot=not args.no_zero_shot, tasks=tasks, seeded=seeded,
                              allocations=allocations)
    else:
        datasets = (args.datasets or "boolq,mmlu,siqa,hellaswag,c4").split(",")
        plan = calibration_configs(tuple(d.strip() for d in datasets if d.strip()),
                                   sparsities[0], args.seed, tasks)
    if args.only:
        by_name = {c.name: c for c in plan}
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        missing = [x for x in wanted if x not in by_name]
        if missing:
            raise UserError(f"--only names unknown configuration '{missing[0]}'; see --plan")
        plan = [by_name[x] for x in wanted]
    if args.plan:
        for c in plan:
            print(f"{c.name:<44} evals: {','.join(c.evals)}")
        return 0
    relate = _relatedness(args.relate) if args.experiment == "calibration" else None
    run = reproduce_table1 if args.experiment == "table1" else reproduce_calibration
    run(settings, args.out, plan)
    print(f"results: {args.out}/configs/*.json")
    if args.experiment == "calibration":
        spec = write_calibration_summary(args.out, plan, relate)["acc"]
        print(f"own calibration set gives the strictly best acc on {spec['own_best']} of "
              f"{len(spec['own'])} tasks ({spec['own_best_by_1se']} by more than one standard "
              f"error): {args.out}/calibration.json")
    return 0


def _relatedness(path: str | None) -> dict | None:
    """The relatedness JSON for ``--relate``, checked before any pruning starts."""
    import json

    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--relate {path}: cannot read it as JSON ({e.__class__.__name__}); "
                        "pass the file `actpat relate --json` wrote") from None
    if not isinstance(data, dict) or "bands" not in data or "datasets" not in data:
        raise UserError(f"--relate {path} is not a relatedness JSON (no 'bands'/'datasets'); "
                        "pass the file `actpat relate --json` wrote")
    return data


def _fig1(args) -> int:
    """Profiles of several datasets, their counts and Figure 1 (skips finished profiles)."""
    from ..experiments.fig1 import reproduce_fig1

    out = Path(args.out)
    datasets = [d.strip() for d in (args.datasets or FIG1_DATASETS).split(",") if d.strip()]
    results = reproduce_fig1(args.model, out, datasets, args.samples or 64, args.seq_len,
                             args.seed, args.batch_size, args.gamma_quantile, args.data_dir,
                             args.device, args.dtype, args.trust_remote_code,
                             progress=not args.quiet)
    for r in results:
        print(f"{r['dataset']:<10} profiled; gamma={r['gamma']:.3g} ({r['gamma_rule']})")
    print(f"counts: {out}/counts.json  figure: {out}/fig1.png")
    return 0
