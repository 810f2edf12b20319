"""actpat eval: perplexity and zero-shot accuracy of a model or a pruned checkpoint."""

from __future__ import annotations

from .common import BUDGET_HELP, STREAM_HELP, add_common
from ..errors import UserError

HELP = "perplexity (wikitext2, c4) and zero-shot acc/acc_norm (boolq piqa siqa hellaswag mmlu)"


def add_arguments(p) -> None:
    from ..evaluation.evaluate import ALL_TASKS

    p.add_argument("--model", required=True,
                   help="alias (smollm2-135m), .gguf path, hub id, or a directory (e.g. from "
                        "`actpat prune --save`)")
    p.add_argument("--tasks", default=",".join(ALL_TASKS),
                   help=f"comma-separated, any of {','.join(ALL_TASKS)} (default: all)")
    p.add_argument("--limit", type=int, default=None,
                   help="perplexity: first N windows; zero-shot: first N items (default: all)")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window (default 256)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="write {task: {metric: value, ...}} here")
    p.add_argument("--max-memory", default=None, help=BUDGET_HELP)
    p.add_argument("--stream-layers", action="store_true",
                   help=STREAM_HELP + "; perplexity and multiple-choice zero-shot tasks")
    add_common(p)


def run(args) -> int:
    from ..evaluation.evaluate import evaluate, format_table, parse_tasks, require_tasks
    from ..models.loading import load_model
    from ..runs import write_json

    tasks = parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 (got {args.limit})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {args.seq_len})")
    from ..models.memory import parse_size
    from ..models.streamed import choose_engine

    budget = parse_size(args.max_memory) if args.max_memory else None
    stream, why = choose_engine(args.model, args.dtype, args.stream_layers, budget, False)
    if stream:
        return _run_streamed(args, tasks, why)
    require_tasks(tasks, args.data_dir)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and args.seq_len > context and any(t in ("wikitext2", "c4") for t in tasks):
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of {context} "
                        "tokens; lower --seq-len")
    results = evaluate(lm.model, lm.tokenizer, tasks, args.limit, args.seq_len, args.batch_size,
                       args.data_dir, progress=not args.quiet)
    starts = any("window_start" in r for r in results.values())
    print(f"# model: {args.model}" + (f"  (perplexity: {_window_rule(results)})"
                                      if starts else ""))
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    return 0


def _run_streamed(args, tasks, why) -> int:
    """Perplexity and zero-shot with decoder layers read from disk one at a time."""
    import sys

    from ..evaluation.evaluate import PERPLEXITY_SPLITS, format_table, load_corpus, require_tasks
    from ..evaluation.streamed import perplexity_streamed, zero_shot_streamed
    from ..models.streamed import open_streamed
    from ..runs import write_json

    require_tasks(tasks, args.data_dir)
    if why and why != "--stream-layers" and not args.quiet:
        print(why, file=sys.stderr)
    sm = open_streamed(args.model, args.dtype, args.trust_remote_code)
    context = getattr(sm.model.config, "max_position_embeddings", None)
    ppl = [t for t in tasks if t in PERPLEXITY_SPLITS]
    if context and args.seq_len > context and ppl:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of {context} "
                        "tokens; lower --seq-len")
    results = {t: perplexity_streamed(sm, load_corpus(sm.tokenizer, t, args.data_dir),
                                      args.seq_len, args.limit, args.batch_size,
                                      progress=not args.quiet) for t in ppl}
    shots = [t for t in tasks if t not in PERPLEXITY_SPLITS]
    if shots:
        results.update(zero_shot_streamed(sm, shots, args.limit, args.batch_size, args.data_dir,
                                          progress=not args.quiet))
    results = {t: results[t] for t in tasks}
    print(f"# model: {args.model}  (streamed" + (f"; perplexity: {_window_rule(results)})"
                                                 if ppl else ")"))
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    return 0


def _window_rule(results: dict) -> str:
    starts = {r["window_start"] for r in results.values() if "window_start" in r}
    return ("BOS + seq_len-1 stream tokens per window, all predicted" if starts == {"bos"} else
            "seq_len stream tokens per window, the first not predicted")
