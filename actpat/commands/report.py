"""actpat report: one self-contained HTML page for any mix of run directories."""

from __future__ import annotations

from .common import add_common

HELP = "write one self-contained HTML page (figures embedded) for run directories"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories (searched recursively) or result "
                                           "JSON files")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--title", default="actpat report")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=float, default=None, help="absolute gamma for the counts")
    g.add_argument("--gamma-quantile", type=float, default=None,
                   help="fraction of all scored weights above gamma (default 0.1)")
    add_common(p, model=False)


def run(args) -> int:
    from ..outputs.report.page import write_report

    q = args.gamma_quantile if args.gamma_quantile is not None else \
        (None if args.gamma is not None else 0.1)
    info = write_report(args.runs, args.out, args.title, args.gamma, q)
    print(f"report: {len(info['sections'])} sections ({', '.join(info['sections']) or 'none'}), "
          f"{info['bytes'] / 1e6:.1f} MB -> {info['out']}")
    for n in info["notes"]:
        print(f"note: {n}")
    return 0
