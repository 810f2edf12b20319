"""actpat prune: prune a model layer by layer with calibration data and save it (HF format)."""

from __future__ import annotations

import sys
import time

from .common import BUDGET_HELP, STREAM_HELP, add_common
from ..errors import UserError
from .allocate import (add_allocation_arguments, add_calibration_arguments, allocation_needs,
                       calibration_info, load_calibration, resolve_allocation)

HELP = "prune a model (wanda, sparsegpt, magnitude; unstructured or N:M) and save it"

OWNED = ("config.json", "generation_config.json", "model.safetensors",
         "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
         "tokenizer.model", "added_tokens.json", "actpat_prune.json")


def add_arguments(p) -> None:
    from ..sparsity.pruners import PRUNERS

    p.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf, directory, hub id")
    p.add_argument("--sparsity", type=float, required=True, help="target S in [0, 1)")
    p.add_argument("--pruner", default="wanda", choices=sorted(PRUNERS))
    p.add_argument("--pattern", default="unstructured", help="unstructured | 2:4 | 4:8 | N:M")
    add_allocation_arguments(p, "--allocation")
    add_calibration_arguments(p)
    p.add_argument("--save", required=True, help="output directory (HF checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --save")
    p.add_argument("--offload", default="none", choices=["none", "cpu"],
                   help="cpu: keep the model in CPU memory and bring one decoder layer at a time "
                        "onto --device (models larger than the GPU)")
    p.add_argument("--max-memory", default=None, help=BUDGET_HELP)
    p.add_argument("--stream-layers", action="store_true", help=STREAM_HELP + "; the pruned "
                   "checkpoint is written one layer shard at a time")
    add_common(p)


def run(args) -> int:
    from ..models.loading import load_model
    from ..sparsity.layerwise import prune_model
    from ..sparsity.pruners import get_pruner
    from ..sparsity.masks import parse_pattern, validate_sparsity
    from ..sparsity.saving import prune_record, save_pruned
    from ..runs import prepare_out_dir

    validate_sparsity(args.sparsity)
    pruner = get_pruner(args.pruner)
    nm = parse_pattern(args.pattern)
    if nm and args.allocation != "uniform":
        raise UserError(f"pattern {args.pattern} fixes every layer at {nm[0]}/{nm[1]}; use "
                        "--allocation uniform or --pattern unstructured")
    if nm and abs(args.sparsity - nm[0] / nm[1]) > 1e-9:
        raise UserError(f"pattern {args.pattern} gives sparsity {nm[0] / nm[1]:g}, not "
                        f"{args.sparsity}; pass --sparsity {nm[0] / nm[1]:g}")
    from ..models.memory import parse_size
    from ..models.streamed import choose_engine
    from ..sparsity.streamed import shard_names

    out = prepare_out_dir(args.save, args.overwrite, owned=OWNED + shard_names(args.save))
    start = time.perf_counter()
    offload = getattr(args, "offload", "none") == "cpu"
    budget = parse_size(args.max_memory) if getattr(args, "max_memory", None) else None
    stream, why = choose_engine(args.model, args.dtype, getattr(args, "stream_layers", False),
                                budget, False)
    if stream:
        return _run_streamed(args, out, start, why)
    lm = load_model(args.model, "cpu" if offload else args.device, args.dtype,
                    args.trust_remote_code)
    needs_calib = pruner.stat is not None or "calibration" in allocation_needs(args, args.allocation)
    samples = load_calibration(args, lm) if needs_calib else None
    sparsities, alloc = resolve_allocation(args, args.allocation, lm, samples)
    if offload:
        from ..models.loading import resolve_device
        from ..sparsity.layerwise import prune_offloaded

        report = prune_offloaded(lm.model, None if samples is None else samples.sequences,
                                 sparsities, args.pruner, args.pattern, args.batch_size,
                                 progress=not args.quiet, device=resolve_device(args.device))
    else:
        report = prune_model(lm.model, None if samples is None else samples.sequences,
                             sparsities, args.pruner, args.pattern, args.batch_size,
                             progress=not args.quiet)
    record = prune_record(lm, args.pruner, args.pattern, alloc, args.sparsity, report,
                          None if samples is None else calibration_info(args, samples),
                          seed=args.seed, dtype=args.dtype, batch_size=args.batch_size,
                          command="actpat " + " ".join(sys.argv[1:])
                          if sys.argv[0].endswith("actpat") else None)
    record["total_seconds"] = round(time.perf_counter() - start, 3)
    save_pruned(lm.model, lm.tokenizer, out, record)
    print(f"pruned {args.model} with {args.pruner} ({args.pattern}, {args.allocation}): target "
          f"{report['target_sparsity']:.4f}, achieved {report['achieved_sparsity']:.4f} in "
          f"{report['seconds']:.1f}s -> {out}")
    return 0


def _run_streamed(args, out, start, why) -> int:
    """``prune`` with decoder layers read from and written to disk one at a time."""
    from ..models.streamed import open_streamed
    from ..runs import write_json
    from ..sparsity.pruners import get_pruner
    from ..sparsity.saving import PRUNE_RECORD, prune_record
    from ..sparsity.streamed import prune_streamed

    if getattr(args, "offload", "none") != "none":
        raise UserError("--stream-layers already holds one layer at a time; drop --offload")
    needs = allocation_needs(args, args.allocation)
    if "calibration" in needs:
        raise UserError(f"allocation '{args.allocation}' profiles or measures the whole model in "
                        "memory; with --stream-layers give --profile from `actpat profile "
                        "--stream-layers` or use another allocation")
    if why and why != "--stream-layers" and not args.quiet:
        print(why, file=sys.stderr)
    sm = open_streamed(args.model, args.dtype, args.trust_remote_code)
    pruner = get_pruner(args.pruner)
    samples = load_calibration(args, sm) if pruner.stat is not None else None
    sparsities, alloc = resolve_allocation(args, args.allocation, sm, samples)
    report = prune_streamed(sm, None if samples is None else samples.sequences, sparsities, out,
                            args.pruner, args.pattern, args.batch_size, progress=not args.quiet)
    record = prune_record(sm, args.pruner, args.pattern, alloc, args.sparsity, report,
                          None if samples is None else calibration_info(args, samples),
                          seed=args.seed, dtype=args.dtype, batch_size=args.batch_size,
                          command="actpat " + " ".join(sys.argv[1:])
                          if sys.argv[0].endswith("actpat") else None)
    record["streamed"] = report["streamed"]
    record["total_seconds"] = round(time.perf_counter() - start, 3)
    write_json(out / PRUNE_RECORD, record)
    print(f"pruned {args.model} with {args.pruner} ({args.pattern}, {args.allocation}), "
          f"streamed: target {report['target_sparsity']:.4f}, achieved "
          f"{report['achieved_sparsity']:.4f} in {report['seconds']:.1f}s -> {out}")
    return 0
