"""actpat counts: activated weights per layer (the paper's N_i, Figure 1)."""

from __future__ import annotations

from .common import add_common

HELP = "count activated weights per layer and matrix type in saved profiles (Figure 1)"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories written by `actpat profile`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=float, default=None, help="absolute threshold")
    g.add_argument("--gamma-quantile", type=float, default=None,
                   help="fraction of the reference run's scored weights above gamma "
                        "(default 0.1); one gamma is then used for every run")
    p.add_argument("--per-run-quantile", action="store_true",
                   help="with --gamma-quantile: a separate gamma for each run instead of one")
    p.add_argument("--json", default=None, help="write the counts here")
    p.add_argument("--plot", default=None, help="write Figure 1 (PNG) here")
    add_common(p, model=False)


def run(args) -> int:
    from ..outputs.plots import plot_layer_counts
    from ..activation.profiling import Profile, counts, counts_one_gamma
    from ..runs import write_json

    if args.gamma is None and args.gamma_quantile is None:
        args.gamma_quantile = 0.1
    profiles = [Profile.load(r) for r in args.runs]
    _check_same_model(args.runs, profiles)
    if args.gamma is None and args.per_run_quantile:
        all_counts = [counts(p, gamma_quantile=args.gamma_quantile) for p in profiles]
    else:  # one gamma for all runs, as in the paper: absolute, or the quantile of the first run
        all_counts = counts_one_gamma(profiles, list(args.runs), args.gamma, args.gamma_quantile)
    results = []
    for run_dir, prof, c in zip(args.runs, profiles, all_counts):
        results.append({"run": run_dir, "dataset": prof.meta.get("dataset"),
                        "data_source": prof.meta.get("data_source"),
                        "samples": prof.meta.get("samples"), "seq_len": prof.meta.get("seq_len"),
                        "seed": prof.meta.get("seed"), **c.to_json()})
    _print_table(results)
    if args.json:
        write_json(args.json, results)
    if args.plot:
        plot_layer_counts(results, args.plot)
    return 0


def _check_same_model(runs, profiles) -> None:
    from ..errors import UserError

    keys = [sorted((k, tuple(v.shape)) for k, v in p.maps.items()) for p in profiles]
    for run, k in zip(runs[1:], keys[1:]):
        if k != keys[0]:
            raise UserError(f"{run} profiles a different model than {runs[0]}; "
                            "count runs of one model together")


def _print_table(results: list[dict]) -> None:
    n = len(results[0]["layer_counts"])
    names = [str(r["dataset"] or r["run"])[:10] for r in results]
    print("layer " + " ".join(f"{x:>10}" for x in names))
    for i in range(n):
        print(f"{i:>5} " + " ".join(f"{r['layer_counts'][i]:>10}" for r in results))
    for r in results:
        print(f"# {r['run']}: gamma={r['gamma']:.3g} ({r['gamma_rule']})")
