"""actpat relate: dataset x dataset activation-pattern similarity from saved profiles (Figure 6).

The ``--json`` file holds::

    {"kind": "actpat-relate", "runs": [...], "datasets": [names], "num_layers": L,
     "per_layer": [N x N per layer], "reference": name,
     "bands": {name: {"start": s, "end": e, "matrix": N x N}},   # [start, end), layer mean
     "ranking": {band: [[dataset, sim], ...]}}                  # closest to reference first

Bands: all, shallow (layers 1 .. 12/32 of depth), deep (16/32 of depth .. L), and custom
(``--layers A:B``).
"""

from __future__ import annotations

from .common import add_common
from ..errors import UserError

HELP = "dataset x dataset similarity of saved activation profiles, per layer band (Figure 6)"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories written by `actpat profile`")
    p.add_argument("--layers", default=None, help="extra band A:B (0-based, B exclusive)")
    p.add_argument("--reference", default=None,
                   help="rank datasets by closeness to this one (default: c4 if present, "
                        "else the first)")
    p.add_argument("--band", default=None, help="band of the heatmap (default: custom if "
                   "--layers is given, else deep)")
    p.add_argument("--plot", default=None, help="write the heatmap (PNG) here")
    p.add_argument("--json", default=None, help="write the matrices and rankings here")
    add_common(p, model=False)


def run(args) -> int:
    from ..analysis.similarity import relate_runs
    from ..outputs.artifacts import write_relate

    result, m = relate_runs(args.runs, args.reference, args.layers)
    band = args.band or ("custom" if args.layers else "deep")
    if band not in m.bands:
        raise UserError(f"--band {band} is not one of {', '.join(m.bands)}")
    _print(m, band, result["reference"])
    write_relate(result, args.json, args.plot, band)
    return 0


def _print(m, band: str, reference: str) -> None:
    s, e = m.bands[band]
    mat = m.band(band)
    short = [n[:9] for n in m.names]
    print(f"similarity, layers [{s}, {e}) ({band}):")
    print(" " * 10 + " ".join(f"{n:>9}" for n in short))
    for n, row in zip(short, mat):
        print(f"{n:>9} " + " ".join(f"{v:9.4f}" for v in row))
    for b in m.bands:
        rank = ", ".join(f"{n} {v:.4f}" for n, v in m.ranking(reference, b))
        print(f"closest to {reference} ({b}): {rank}")
