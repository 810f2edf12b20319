"""actpat counts: activated weights per layer (the paper's N_i, Figure 1)."""

from __future__ import annotations

from ..cli import add_common

HELP = "count activated weights per layer and matrix type in saved profiles (Figure 1)"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories written by `actpat profile`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=float, default=None, help="absolute threshold")
    g.add_argument("--gamma-quantile", type=float, default=None,
                   help="fraction of all scored weights above gamma (default 0.1)")
    p.add_argument("--json", default=None, help="write the counts here")
    p.add_argument("--plot", default=None, help="write Figure 1 (PNG) here")
    add_common(p, model=False)


def run(args) -> int:
    from ..plots import plot_layer_counts
    from ..profile import Profile, counts, write_json

    if args.gamma is None and args.gamma_quantile is None:
        args.gamma_quantile = 0.1
    results = []
    for run_dir in args.runs:
        prof = Profile.load(run_dir)
        c = counts(prof, args.gamma, args.gamma_quantile)
        results.append({"run": run_dir, "dataset": prof.meta.get("dataset"),
                        "data_source": prof.meta.get("data_source"), **c.to_json()})
    _print_table(results)
    if args.json:
        write_json(args.json, results)
    if args.plot:
        plot_layer_counts(results, args.plot)
    return 0


def _print_table(results: list[dict]) -> None:
    n = len(results[0]["layer_counts"])
    names = [str(r["dataset"] or r["run"])[:10] for r in results]
    print("layer " + " ".join(f"{x:>10}" for x in names))
    for i in range(n):
        print(f"{i:>5} " + " ".join(f"{r['layer_counts'][i]:>10}" for r in results))
    for r in results:
        print(f"# {r['run']}: gamma={r['gamma']:.3g} ({r['gamma_rule']})")
