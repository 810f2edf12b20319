"""actpat similarity: per-layer activation-pattern similarity of sample pairs (Figures 2-5).

One dataset: within-domain pairs (sample k with sample P + k of 2P different samples).
Two datasets: cross-domain pairs (sample k of A with sample k of B). Three or more: every
dataset's within pairs and every two datasets' cross pairs, from one joint pass.
Writes RUN/similarity.json (fields: ``actpat.similarity``), RUN/similarity_boxes.png and
RUN/similarity_median.png.
"""

from __future__ import annotations

from .common import add_common, add_stream_arguments
from ..errors import UserError

HELP = "per-layer similarity of activation patterns of sample pairs, within or across datasets"
OWNED = ("similarity.json", "similarity_boxes.png", "similarity_median.png")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf path, directory or hub id")
    p.add_argument("--dataset", action="append", required=True,
                   help="dataset name or .jsonl/.txt path; once: within-domain pairs; twice: "
                        "cross-domain pairs; more: all of them")
    p.add_argument("--pairs", type=int, default=64, help="pairs per comparison (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="longer texts keep their first tokens")
    p.add_argument("--pairs-per-batch", type=int, default=2)
    p.add_argument("--split", default=None, help="default: each dataset's usual split")
    p.add_argument("--objective", default="max-logit", help="max-logit (paper) | nll")
    p.add_argument("--text-field", default="text", help="field of a local .jsonl file")
    p.add_argument("--template", default=None, help="e.g. 'Q: {question}\\nA:' for a .jsonl file")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    add_stream_arguments(p)
    add_common(p)


def run(args) -> int:
    from ..analysis.similarity import similarity_run
    from .common import run_pairs_command

    if args.pairs <= 0:
        raise UserError(f"--pairs must be at least 1 (got {args.pairs})")
    if args.pairs_per_batch <= 0:
        raise UserError(f"--pairs-per-batch must be at least 1 (got {args.pairs_per_batch})")
    if len(set(args.dataset)) != len(args.dataset):
        raise UserError("a --dataset is given twice; for within-domain pairs give it once")
    from ..data.datasets import require_records

    for dataset in args.dataset:
        require_records(dataset, args.split, args.data_dir)
    return run_pairs_command(
        args, OWNED, lambda lm, progress: similarity_run(
            lm, args.dataset, args.pairs, args.seq_len, args.seed, args.split, args.data_dir,
            args.objective, args.pairs_per_batch, args.text_field, args.template,
            progress=progress),
        write_outputs)


def write_outputs(result: dict, out) -> None:
    from ..outputs.artifacts import write_similarity

    write_similarity(result, out)
    print_summary(result)


def print_summary(result: dict) -> None:
    comps = result["comparisons"]
    layers = result["num_layers"]
    names = [(c["datasets"][0] if c["kind"] == "within" else "×".join(c["datasets"]))[:14]
             for c in comps]
    print("median pair similarity per layer")
    print("layer " + " ".join(f"{n:>14}" for n in names))
    for i in range(layers):
        print(f"{i:>5} " + " ".join(f"{c['summary']['median'][i] or float('nan'):>14.4f}"
                                    for c in comps))
    t = result["timing"]
    print(f"# {t['samples_scored']} samples scored in {t['seconds']:.1f}s "
          f"({t['seconds_per_sample']:.3f} s/sample), peak RSS {t['peak_rss_mb']} MB")
