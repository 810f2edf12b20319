"""actpat prune: prune a model layer by layer with calibration data and save it (HF format)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .common import BUDGET_HELP, STREAM_HELP, add_common
from ..errors import UserError
from .allocate import (add_allocation_arguments, add_calibration_arguments, allocation_needs,
                       calibration_info, held_count, load_calibration, require_calibration,
                       resolve_allocation)

HELP = ("prune a model (wanda, sparsegpt, magnitude; unstructured or N:M; whole decoder layers "
        "with --drop-layers) and save it")

OWNED = ("config.json", "generation_config.json", "model.safetensors",
         "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
         "tokenizer.model", "added_tokens.json", "actpat_prune.json")


def add_arguments(p) -> None:
    from ..sparsity.pruners import PRUNERS
    from ..sparsity.saving import SAVE_DTYPES

    p.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf, directory, hub id")
    p.add_argument("--sparsity", type=float, required=True, help="target S in [0, 1)")
    p.add_argument("--pruner", default="wanda", choices=sorted(PRUNERS))
    p.add_argument("--pattern", default="unstructured", help="unstructured | 2:4 | 4:8 | N:M")
    add_allocation_arguments(p, "--allocation")
    add_calibration_arguments(p)
    add_depth_arguments(p)
    p.add_argument("--save", required=True, help="output directory (HF checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --save")
    p.add_argument("--save-dtype", default="auto", choices=SAVE_DTYPES,
                   help="dtype of the saved weights; auto (default): the checkpoint's own (a "
                        "bfloat16 model pruned with --dtype float32 is saved in bfloat16)")
    p.add_argument("--offload", default="none", choices=["none", "cpu"],
                   help="cpu: keep the model in CPU memory and bring one decoder layer at a time "
                        "onto --device (models larger than the GPU)")
    p.add_argument("--max-memory", default=None, help=BUDGET_HELP)
    p.add_argument("--stream-layers", action="store_true", help=STREAM_HELP + "; the pruned "
                   "checkpoint is written one layer shard at a time")
    add_common(p)


def add_depth_arguments(p) -> None:
    from ..sparsity.depth import LAYER_SCORES, SEARCH_OBJECTIVES

    p.add_argument("--drop-layers", type=int, default=0,
                   help="first remove this many whole decoder layers (the saved model has fewer "
                        "layers); --sparsity 0 then only removes layers")
    p.add_argument("--layer-score", default="activation", choices=LAYER_SCORES,
                   help="which layers go: activation (fewest activated weights N_i, from "
                        "--profile or the calibration data), block-influence (ShortGPT), "
                        "search (greedy, seeded with the activation ranking)")
    p.add_argument("--layer-search-samples", type=int, default=16,
                   help="search: held-apart calibration windows scoring each trial, drawn after "
                        "the --calibration-samples ones (16)")
    p.add_argument("--layer-search-width", type=int, default=4,
                   help="search: candidates tried per removed layer (4)")
    p.add_argument("--layer-search-objective", default="kl", choices=SEARCH_OBJECTIVES,
                   help="search: KL to the dense model (kl, default) or perplexity (ppl)")


def _depth_needs(args) -> set[str]:
    """What the layer score needs loaded: "counts" and/or "calibration"."""
    if args.drop_layers == 0:
        return set()
    needs = {"calibration"} if args.layer_score != "activation" else set()
    if args.layer_score in ("activation", "search"):
        needs.add("counts")
        if args.profile is None:
            needs.add("calibration")
    return needs


def _remove_layers(args, lm, samples, held_apart) -> tuple[dict, object]:
    """Choose and remove --drop-layers layers; returns (the record's "depth", the dense
    model's activation Counts or None)."""
    from ..sparsity.allocators import activation_counts
    from ..sparsity.depth import check_drop, choose_layers, remove_layers
    from ..models.architectures import decoder_layers

    check_drop(args.drop_layers, len(decoder_layers(lm.model)))
    counts = source = None
    if "counts" in _depth_needs(args):
        seqs = None if samples is None else samples.sequences[:args.profile_samples]
        counts, source = activation_counts(profile_dir=args.profile, lm=lm, calib_sequences=seqs,
                                           gamma=args.gamma, gamma_quantile=args.gamma_quantile,
                                           progress=not args.quiet)
    drop, why = choose_layers(
        lm.model, args.drop_layers, args.layer_score,
        activation=None if counts is None else counts.layer_counts,
        calibration=None if samples is None else samples.sequences, held_apart=held_apart,
        width=args.layer_search_width, objective=args.layer_search_objective,
        batch_size=args.batch_size,
        progress=not args.quiet)
    if source is not None:
        why["counts_source"] = {k: v for k, v in source.items() if k != "counts"}
    why.update(remove_layers(lm.model, drop))
    return why, counts


def _kept_allocation(args, counts, kept: list[int]) -> tuple[list[float], dict]:
    """S_i of the kept layers by a counts allocator: the dense model's N_i of those layers."""
    from ..sparsity.allocators import ALLOCATORS, allocate

    options = {o.name: getattr(args, o.name) for o in ALLOCATORS.get(args.allocation).options}
    def kept_only(table):
        return {t: [v[i] for i in kept] for t, v in table.items()}

    s = allocate(args.allocation, args.sparsity, counts=[counts.layer_counts[i] for i in kept],
                 layer_sizes=[counts.scored_per_layer[i] for i in kept],
                 matrix_counts=kept_only(counts.matrix_counts),
                 matrix_sizes=kept_only(counts.scored_per_matrix), **options)
    info = {"method": args.allocation, "sparsity": args.sparsity, **options,
            "counts": {"from": "the dense model's profile, kept layers only",
                       "gamma": counts.gamma, "gamma_rule": counts.gamma_rule},
            "layer_sparsities": s}
    if hasattr(s, "per_matrix"):
        info["matrix_sparsities"] = s.per_matrix
    return s, info


def run(args) -> int:
    from ..models.loading import load_model
    from ..sparsity.layerwise import prune_model
    from ..sparsity.pruners import get_pruner
    from ..sparsity.masks import parse_pattern, validate_sparsity
    from ..sparsity.saving import prune_record, save_dtype, save_pruned
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
    if args.drop_layers < 0:
        raise UserError(f"--drop-layers must be >= 0 (got {args.drop_layers})")
    if args.drop_layers and args.layer_score == "search" and args.layer_search_samples < 1:
        raise UserError("--layer-score search needs --layer-search-samples of at least 1")
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
        if args.drop_layers:
            raise UserError("--drop-layers needs the whole model in memory; drop "
                            "--stream-layers or raise --max-memory")
        return _run_streamed(args, out, start, why)
    prunes = args.sparsity > 0 or nm is not None
    needs_calib = prunes and (pruner.stat is not None or
                              "calibration" in allocation_needs(args, args.allocation))
    needs_calib = needs_calib or "calibration" in _depth_needs(args)
    if needs_calib:
        require_calibration(args)
    lm = load_model(args.model, "cpu" if offload else args.device, args.dtype,
                    args.trust_remote_code)
    samples = held_apart = alloc_held = None
    if needs_calib:
        from ..sparsity.allocation_search import split_held

        searching = args.drop_layers and args.layer_score == "search"
        extra = args.layer_search_samples if searching else 0
        held = held_count(args, args.allocation) if prunes else 0
        samples = load_calibration(argparse.Namespace(
            **dict(vars(args), calibration_samples=args.calibration_samples + extra)), lm, held)
        # the allocator's held-apart windows are the last of the draw; they never prune
        samples, alloc_held = split_held(samples, held)
        if extra:  # the same draw, so the search's windows are other documents / offsets
            held_apart = samples.sequences[args.calibration_samples:]
            held_indices = samples.indices[args.calibration_samples:]
            samples = dataclasses.replace(
                samples, sequences=samples.sequences[:args.calibration_samples],
                indices=samples.indices[:args.calibration_samples])
    depth, counts = (_remove_layers(args, lm, samples, held_apart) if args.drop_layers
                     else (None, None))
    from ..sparsity.allocators import ALLOCATORS

    if depth and counts is not None and "counts" in ALLOCATORS.get(args.allocation).needs:
        sparsities, alloc = _kept_allocation(args, counts, depth["kept"])
    else:
        sparsities, alloc = resolve_allocation(args, args.allocation, lm, samples, alloc_held)
    pruner_name = args.pruner if prunes else "magnitude"  # S = 0: nothing to score
    if offload:
        from ..models.loading import resolve_device
        from ..sparsity.layerwise import prune_offloaded

        report = prune_offloaded(lm.model, None if samples is None else samples.sequences,
                                 sparsities, pruner_name, args.pattern, args.batch_size,
                                 progress=not args.quiet, device=resolve_device(args.device))
    else:
        report = prune_model(lm.model, None if samples is None else samples.sequences,
                             sparsities, pruner_name, args.pattern, args.batch_size,
                             progress=not args.quiet)
    record = prune_record(lm, args.pruner if prunes else "none", args.pattern, alloc,
                          args.sparsity, report,
                          None if samples is None else calibration_info(args, samples),
                          seed=args.seed, dtype=args.dtype, batch_size=args.batch_size,
                          command="actpat " + " ".join(sys.argv[1:])
                          if sys.argv[0].endswith("actpat") else None)
    record["depth"] = depth
    if depth and held_apart is not None:
        record["depth"]["search_windows"] = {"samples": len(held_apart),
                                             "indices": held_indices,
                                             "drawn": "after the calibration windows"}
    record["total_seconds"] = round(time.perf_counter() - start, 3)
    save_pruned(lm.model, lm.tokenizer, out, record,
                save_dtype(args.save_dtype, lm.identity.get("stored_dtype"), args.dtype))
    if depth:
        print(f"removed {len(depth['removed'])} of {depth['num_layers_before']} decoder layers "
              f"by {args.layer_score}: {depth['removed']}")
    print(f"pruned {args.model} with {record['pruner']} ({args.pattern}, {args.allocation}): "
          f"target {report['target_sparsity']:.4f}, achieved {report['achieved_sparsity']:.4f} "
          f"in {report['seconds']:.1f}s -> {out}")
    return 0


def _run_streamed(args, out, start, why) -> int:
    """``prune`` with decoder layers read from and written to disk one at a time."""
    from ..models.streamed import open_streamed
    from ..runs import write_json
    from ..sparsity.pruners import get_pruner
    from ..sparsity.saving import PRUNE_RECORD, prune_record, save_dtype
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
                            args.pruner, args.pattern, args.batch_size, progress=not args.quiet,
                            save_dtype=save_dtype(args.save_dtype, sm.identity.get("stored_dtype"),
                                                  args.dtype))
    record = prune_record(sm, args.pruner, args.pattern, alloc, args.sparsity, report,
                          None if samples is None else calibration_info(args, samples),
                          seed=args.seed, dtype=args.dtype, batch_size=args.batch_size,
                          command="actpat " + " ".join(sys.argv[1:])
                          if sys.argv[0].endswith("actpat") else None)
    record["streamed"], record["saved_dtype"] = report["streamed"], report["saved_dtype"]
    record["total_seconds"] = round(time.perf_counter() - start, 3)
    write_json(out / PRUNE_RECORD, record)
    print(f"pruned {args.model} with {args.pruner} ({args.pattern}, {args.allocation}), "
          f"streamed: target {report['target_sparsity']:.4f}, achieved "
          f"{report['achieved_sparsity']:.4f} in {report['seconds']:.1f}s -> {out}")
    return 0
