"""actpat sts: does activation-pattern similarity track human sentence similarity? (Finding 3)

Writes RUN/sts.json (fields: ``actpat.sts``) and RUN/sts_layers.png (rho per layer, with the
hidden-state baselines).
"""

from __future__ import annotations

from .common import add_common, add_stream_arguments
from ..errors import UserError

HELP = "Spearman correlation of per-layer pattern similarity with STS-B/SICK scores, with baselines"
OWNED = ("sts.json", "sts_layers.png")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf path, directory or hub id")
    p.add_argument("--dataset", required=True, help="stsb | sick | a .jsonl file of sentence pairs")
    p.add_argument("--pair-fields", default=None,
                   help="A,B,SCORE fields (defaults: stsb sentence1,sentence2,score; sick "
                        "sentence_A,sentence_B,relatedness_score; files as stsb)")
    p.add_argument("--samples", type=int, default=256,
                   help="pairs (default 256; 0 = all); registered sets: seeded sample, files: first N")
    p.add_argument("--split", default=None, help="default: the dataset's usual split")
    p.add_argument("--max-tokens", type=int, default=128, help="truncate longer sentences")
    p.add_argument("--pairs-per-batch", type=int, default=8)
    p.add_argument("--objective", default="max-logit", help="max-logit (paper) | nll")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    add_stream_arguments(p)
    add_common(p)


def parse_pair_fields(text: str | None) -> tuple[str, str, str] | None:
    if text is None:
        return None
    fields = tuple(f.strip() for f in text.split(","))
    if len(fields) != 3 or not all(fields):
        raise UserError(f"--pair-fields '{text}' must name three fields: A,B,SCORE")
    return fields


def run(args) -> int:
    from ..analysis.sts import load_pairs, sts_run
    from .common import run_pairs_command

    fields = parse_pair_fields(args.pair_fields)
    if args.samples < 0:
        raise UserError(f"--samples must be >= 0 (0 = all pairs); got {args.samples}")
    if args.bootstrap < 100:
        raise UserError(f"--bootstrap {args.bootstrap} is too few resamples; use 100 or more")
    if args.max_tokens < 1 or args.pairs_per_batch < 1:
        raise UserError("--max-tokens and --pairs-per-batch must be at least 1")
    pairs = load_pairs(args.dataset, args.samples or None, args.seed, args.split, args.data_dir,
                       fields)
    return run_pairs_command(
        args, OWNED, lambda lm, progress: sts_run(
            lm, pairs, args.max_tokens, args.pairs_per_batch, args.objective, args.bootstrap,
            args.seed, progress=progress),
        write_outputs)


def write_outputs(result: dict, out) -> None:
    from ..outputs.artifacts import write_sts

    write_sts(result, out)
    print_summary(result)


def _f(v, spec=".3f"):
    return "  n/a" if v is None else format(v, spec)


def print_summary(result: dict) -> None:
    names = list(result["baselines"])
    print(f"{result['dataset']}: {result['samples']} pairs; Spearman rho per layer "
          f"(95% bootstrap interval for activation)")
    print("layer  activation  [  interval  ]  " + "  ".join(f"{n:>11}" for n in names))
    for i, r in enumerate(result["per_layer_spearman"]):
        lo, hi = result["per_layer_ci"][i]
        base = "  ".join(f"{_f(result['baselines'][n][i]):>11}" for n in names)
        print(f"{i:>5}  {_f(r):>10}  [{_f(lo)}, {_f(hi)}]  {base}")
    for name, b in result["bands"].items():
        lo, hi = b["ci"]
        print(f"band {name:<16} layers [{b['start']}, {b['end']}): rho {_f(b['rho'])} "
              f"(p {_f(b['p'], '.2g')}) [{_f(lo)}, {_f(hi)}]")
    best = ", ".join(f"{k} layer {v['layer']} rho {_f(v['rho'])}" for k, v in result["best"].items())
    print(f"best single layer: {best}")
