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

from ..cli import add_common
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


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--layers '{text}' is not A:B (two integers, e.g. 16:30)") from None
    if not 0 <= a < b <= num_layers:
        raise UserError(f"--layers {text} is outside the model's {num_layers} layers; "
                        f"use A:B with 0 <= A < B <= {num_layers}")
    return a, b


def run(args) -> int:
    from ..outputs.plots import plot_relatedness
    from ..activation.profiling import Profile
    from ..runs import write_json
    from ..analysis.similarity import dataset_similarity, relate_bands

    if len(args.runs) < 2:
        raise UserError("give at least two profile runs to relate")
    profiles = [Profile.load(r) for r in args.runs]
    names = [str(p.meta.get("dataset") or r) for p, r in zip(profiles, args.runs)]
    if len(set(names)) != len(names):
        names = [f"{n} ({r})" for n, r in zip(names, args.runs)]
    first = profiles[0]
    for p, r in zip(profiles[1:], args.runs[1:]):
        if list(p.maps) != list(first.maps):
            raise UserError(f"{r} profiles a different model than {args.runs[0]}; relate runs "
                            "of one model")
    bands = relate_bands(first.num_layers)
    if args.layers:
        bands["custom"] = parse_layers(args.layers, first.num_layers)
    band = args.band or ("custom" if args.layers else "deep")
    if band not in bands:
        raise UserError(f"--band {band} is not one of {', '.join(bands)}")
    reference = args.reference or ("c4" if "c4" in names else names[0])
    if reference not in names:
        raise UserError(f"--reference {reference} is not among the datasets ({', '.join(names)})")
    m = dataset_similarity(profiles, names, bands)
    result = {
        "kind": "actpat-relate", "runs": list(args.runs), "datasets": names,
        "num_layers": first.num_layers, "reference": reference,
        "per_layer": m.per_layer.tolist(),
        "bands": {b: {"start": s, "end": e, "matrix": m.band(b).tolist()}
                  for b, (s, e) in bands.items()},
        "ranking": {b: [list(x) for x in m.ranking(reference, b)] for b in bands},
    }
    _print(m, band, reference)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        s, e = bands[band]
        plot_relatedness(names, m.band(band), args.plot,
                         title=f"Activation-pattern similarity, layers {s}-{e - 1} ({band})")
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
