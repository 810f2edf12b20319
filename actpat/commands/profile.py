"""actpat profile: a dataset's mean activation map (METHOD.md section 1)."""

from __future__ import annotations

from ..cli import add_common
from ..errors import UserError

HELP = "score every weight on a dataset's samples and save the mean activation map"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf path, directory or hub id")
    p.add_argument("--dataset", required=True, help="registered name or a .jsonl/.txt path")
    p.add_argument("--split", default=None, help="default: the dataset's usual split")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="longer texts keep their first tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--objective", default="max-logit", help="max-logit (paper) | nll")
    p.add_argument("--text-field", default="text", help="field of a local .jsonl file")
    p.add_argument("--template", default=None, help="e.g. 'Q: {question}\\nA:' for a .jsonl file")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    add_common(p)


def run(args) -> int:
    from ..data import sample_sequences
    from ..models import load_model
    from ..profile import PROFILE_FILE, SUMMARY_FILE, compute_profile
    from ..runs import prepare_out_dir

    if args.samples <= 0:
        raise UserError(f"--samples must be at least 1 (got {args.samples})")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    out = prepare_out_dir(args.out, args.overwrite, owned=(PROFILE_FILE, SUMMARY_FILE, "checkpoint"))
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of {context} "
                        "tokens; lower --seq-len")
    samples = sample_sequences(lm.tokenizer, args.dataset, args.samples, args.seq_len, args.seed,
                               args.split, args.data_dir, args.text_field, args.template)
    meta = {"model": lm.identity, "dataset": args.dataset, "split": samples.split,
            "data_source": samples.source, "seq_len": args.seq_len, "seed": args.seed,
            "sample_indices": samples.indices, "dtype": args.dtype,
            "device": str(next(lm.model.parameters()).device)}
    profile = compute_profile(lm, samples.sequences, args.batch_size, args.objective, meta,
                              progress=not args.quiet)
    profile.save(out)
    m = profile.meta
    print(f"profiled {m['samples']} samples ({m['tokens_scored']} tokens) of {args.dataset} "
          f"[{samples.source}] in {m['wall_time_s']:.1f}s -> {out}/{PROFILE_FILE}")
    return 0
