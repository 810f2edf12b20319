"""actpat similarity: per-layer activation-pattern similarity of sample pairs (Figures 2-5).

One dataset: within-domain pairs (sample k with sample P + k of 2P different samples).
Two datasets: cross-domain pairs (sample k of A with sample k of B). Three or more: every
dataset's within pairs and every two datasets' cross pairs, from one joint pass.
Writes RUN/similarity.json (fields: ``actpat.similarity``), RUN/similarity_boxes.png and
RUN/similarity_median.png.
"""

from __future__ import annotations

from ..cli import add_common
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
    add_common(p)


def run(args) -> int:
    from ..runs import run_pairs_command

    if args.pairs <= 0:
        raise UserError(f"--pairs must be at least 1 (got {args.pairs})")
    if args.pairs_per_batch <= 0:
        raise UserError(f"--pairs-per-batch must be at least 1 (got {args.pairs_per_batch})")
    if len(set(args.dataset)) != len(args.dataset):
        raise UserError("a --dataset is given twice; for within-domain pairs give it once")
    return run_pairs_command(
        args, OWNED, lambda lm, progress: similarity_run(
            lm, args.dataset, args.pairs, args.seq_len, args.seed, args.split, args.data_dir,
            args.objective, args.pairs_per_batch, args.text_field, args.template,
            progress=progress),
        write_outputs)


def similarity_run(lm, datasets: list[str], pairs: int, seq_len: int, seed: int = 0,
                   split: str | None = None, data_dir: str | None = None,
                   objective: str = "max-logit", pairs_per_batch: int = 2,
                   text_field: str = "text", template: str | None = None,
                   progress: bool = True) -> dict:
    """Sample, score and compare; returns the similarity.json object."""
    import resource
    import time

    from ..data.datasets import sample_sequences
    from ..runs import versions
    from ..analysis.similarity import comparison_json, group_similarity, pair_similarity

    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens")
    per_set = pairs if len(datasets) == 2 else 2 * pairs
    samples = {d: sample_sequences(lm.tokenizer, d, per_set, seq_len, seed, split, data_dir,
                                   text_field, template) for d in datasets}
    start = time.perf_counter()
    comparisons = []
    if len(datasets) == 1:
        (d, s), = samples.items()
        sims = pair_similarity(lm, [(s.sequences[k], s.sequences[pairs + k]) for k in range(pairs)],
                               pairs_per_batch, objective, progress, desc=f"{d} pairs")
        idx = [(s.indices[k], s.indices[pairs + k]) for k in range(pairs)]
        comparisons.append(comparison_json("within", d, d, sims, idx))
        scored = sims.samples_scored
    elif len(datasets) == 2:
        (a, sa), (b, sb) = samples.items()
        sims = pair_similarity(lm, list(zip(sa.sequences, sb.sequences)), pairs_per_batch,
                               objective, progress, desc=f"{a} x {b} pairs")
        comparisons.append(comparison_json("cross", a, b, sims, list(zip(sa.indices, sb.indices))))
        scored = sims.samples_scored
    else:
        res = group_similarity(lm, {d: s.sequences for d, s in samples.items()}, objective,
                               progress)
        for d, sims in res.within.items():
            ix = samples[d].indices
            comparisons.append(comparison_json("within", d, d, sims,
                                               [(ix[k], ix[pairs + k]) for k in range(pairs)]))
        for (a, b), sims in res.cross.items():
            comparisons.append(comparison_json("cross", a, b, sims, list(zip(
                samples[a].indices[:pairs], samples[b].indices[:pairs]))))
        scored = res.samples_scored
    seconds = time.perf_counter() - start
    first = comparisons[0]
    return {
        "kind": "actpat-similarity", "model": lm.identity, "objective": objective,
        "seq_len": seq_len, "seed": seed, "pairs": pairs,
        "num_layers": len(first["per_pair"][0]), "matrix_types": list(first["per_matrix"]),
        "datasets": {d: {"source": s.source, "split": s.split, "sample_indices": s.indices,
                         "tokens": sum(len(x) for x in s.sequences)} for d, s in samples.items()},
        "comparisons": comparisons,
        "timing": {"seconds": round(seconds, 2), "samples_scored": scored,
                   "seconds_per_pair_comparison": round(seconds / max(1, sum(
                       len(c["per_pair"]) for c in comparisons)), 4),
                   "seconds_per_sample": round(seconds / max(1, scored), 4),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "versions": versions(),
    }


def write_outputs(result: dict, out) -> None:
    from pathlib import Path

    from ..outputs.plots import plot_similarity_boxes, plot_similarity_medians
    from ..runs import write_json

    out = Path(out)
    write_json(out / "similarity.json", result)
    comps = result["comparisons"]
    plot_similarity_boxes(comps[:4] if len(comps) > 4 else comps, out / "similarity_boxes.png")
    plot_similarity_medians(comps, out / "similarity_median.png")
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
